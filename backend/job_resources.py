"""The workbench a loop job runs with: settings, Label Studio, the project's model store,
Redis. Layer L2.

Built once per job from `Settings.from_env(os.environ)`; the Redis connection is the job's own.
The model store is the project's own (`ModelStore.for_project`): a job for project A never
reads or writes project B's versions, CURRENT or "trained through" set.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from redis import Redis
from rq import get_current_job

from backend.classifier import pick_device
from backend.label_config import LabelConfig, parse_label_config
from backend.labelstudio import (
    FilterOperator,
    LabelStudioClient,
    TaskFilter,
    not_predicted_by,
    set_filter,
    unlabelled_filter,
)
from backend.loop_keys import HeldLock, job_heartbeat, project_lock
from backend.model_store import ModelStore
from backend.settings import Settings
from backend.wafer_sets import INITIAL_SET
from backend.wafer_store import WaferStore


@dataclass
class JobResources:
    """Everything a job touches, built once per job from the settings."""

    settings: Settings
    labels: LabelConfig
    client: LabelStudioClient
    store: ModelStore
    redis: Redis
    auto_user: int
    #: The project's stored die maps (by task id) and set routings.
    wafers: WaferStore
    #: The rq job this workbench serves (None outside a job, e.g. the reconcile command).
    job_id: str | None = None
    #: The project lock while `project_lock` holds it (None outside it).
    held: HeldLock | None = None

    @classmethod
    def open(
        cls, settings: Settings, redis: Redis, project: int, job_id: str | None = None
    ) -> JobResources:
        """Connect to Label Studio and open the project's model store."""
        url, key = settings.require_label_studio()
        labels = parse_label_config(settings.label_config_path.read_text())
        store = ModelStore.for_project(settings.model_dir, project, pick_device(settings.device))
        client = LabelStudioClient.connect(url, key)
        try:
            auto_user = client.current_user_id()
        except BaseException:
            client.close()
            raise
        return cls(
            settings=settings,
            labels=labels,
            client=client,
            store=store,
            redis=redis,
            auto_user=auto_user,
            wafers=WaferStore.for_project(settings.model_dir, project),
            job_id=job_id,
        )

    def close(self) -> None:
        self.client.close()

    @contextmanager
    def project_lock(self, project: int) -> Iterator[HeldLock]:
        """The project's lock, held by this job (see `backend.loop_keys.project_lock`); the
        steps inside call `check_lock` before each write."""
        with project_lock(self.redis, project, self.job_id) as held:
            self.held = held
            try:
                yield held
            finally:
                self.held = None

    def check_lock(self, step: str) -> None:
        """Raise `backend.loop_keys.LockLostError` when the project lock this job holds was lost
        (it was paused past the lock's expiry): call before each step that writes. Nothing to
        check outside `project_lock` (a step run on its own, e.g. from a test)."""
        if self.held is not None:
            self.held.check(step)


def job_redis(settings: Settings) -> tuple[Redis, str | None]:
    """The running rq job's Redis connection and id, or (outside a job) REDIS_URL and None."""
    job = get_current_job()
    if job is None:
        return Redis.from_url(settings.redis_url), None
    return job.connection, job.id


@contextmanager
def open_job_resources(project: int) -> Iterator[JobResources]:
    """The project's workbench in the running rq job (or, outside a job, on REDIS_URL), with the
    job's heartbeat kept alive while it is open; closed after."""
    settings = Settings.from_env(os.environ)
    redis, job_id = job_redis(settings)
    with job_heartbeat(redis, job_id):
        resources = JobResources.open(settings, redis, project, job_id)
        try:
            yield resources
        finally:
            resources.close()


def loop_position(client: LabelStudioClient, project: int) -> tuple[int | None, int | None]:
    """(finished_through, open_set) from two small queries per set, whatever the project's size.

    Sets are numbered 0 (the initial set), 1, 2, ... without gaps; the first number without
    any task ends the walk.
    """
    finished_through: int | None = None
    number = INITIAL_SET
    while client.first_task(project, [set_filter(number)]) is not None:
        if client.first_task(project, [set_filter(number), unlabelled_filter()]) is not None:
            return finished_through, number
        finished_through = number
        number += 1
    return finished_through, None


def untried_wafers(client: LabelStudioClient, project: int, set_number: int, version: str) -> int:
    """How many wafers of the set the model `version` has not tried yet, from Label Studio itself
    (two counting queries, whatever the set's size).

    A wafer is tried when it holds a prediction of `version`, or when its picture could not be
    read (pre-annotation then writes `data.model_version` into it); a wafer with neither (added
    later, or whose TASKS_CREATED webhook was lost) waits.
    """
    unpredicted = [set_filter(set_number), not_predicted_by(version)]
    unreadable = TaskFilter("data.model_version", FilterOperator.EQUAL, "String", version)
    return client.count_tasks(project, unpredicted) - client.count_tasks(
        project, [*unpredicted, unreadable]
    )
