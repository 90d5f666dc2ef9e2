"""The offline study: the labeling loop replayed on labelled wafers, and what it measures.

It imports the served core (`backend`), never `backend.harness`; the core never imports it.
"""
