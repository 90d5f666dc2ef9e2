"""Screenshots of the engineer's two screens in Label Studio, as a person's browser shows them.

Layer L3 (an entry point). A headless Chromium (backend.harness.browser; Debian's `chromium` package)
logs in to Label Studio with an e-mail and password, opens the project's engineer queue tab
and then its labeling stream (what "Label All Tasks" opens: the most uncertain wafer first), and
saves each as a PNG of the window size (1600x1000 by default). It also reads back what a person
would check by eye: the column headers in the order the tab shows them, and where the picture
and the failure-type choices sit in the window.

    python -m backend.harness.screenshots --logins runs/demo/logins.json --project "Wafer maps" --out shots
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

from backend.harness.browser import Box, BrowserError, HeadlessChromium
from backend.projects import ENGINEER_VIEW

QUEUE_PNG = "engineer-queue.png"
LABELING_PNG = "labeling-screen.png"
#: The failure-type choices and the picture's canvas on Label Studio 1.23.2's labeling screen.
CHOICES = ".lsf-choices"
PICTURE = ".lsf-object .konvajs-content"
#: How long a page may take to show what is waited for (Label Studio's first page load on a
#: busy 2-core machine takes several seconds).
PAGE_TIMEOUT = 90.0

# JavaScript run in the page. Label Studio 1.23.2's Data Manager and editor class names.
_HEADERS_JS = """
[...document.querySelectorAll('.lsf-table-head [data-id], .dm-table-head [data-id]')]
  .map(c => c.getAttribute('data-id'))
"""
_ROWS_JS = (
    "document.querySelectorAll('.dm-table__row-wrapper, [class*=\"table__row-wrapper\"]').length"
)
_THUMBS_READY_JS = """
(() => {
  const imgs = [...document.querySelectorAll('.dm-table__row-wrapper img, [class*="table__row-wrapper"] img')];
  return imgs.length > 0 && imgs.every(i => i.complete && i.naturalWidth > 0);
})()
"""
_EDITOR_READY_JS = """
(() => {
  const choices = document.querySelector('.lsf-choices');
  const img = document.querySelector('.lsf-main-content img, .lsf-image-view img, [class*="image-element"] img, .lsf-main-view img');
  return !!choices && choices.querySelectorAll('input').length > 0 && !!img && img.complete && img.naturalWidth > 0;
})()
"""
#: The picture is drawn on Label Studio's canvas some time after its <img> has loaded.
_PICTURE_DRAWN_JS = """
[...document.querySelectorAll('.lsf-object canvas')].some(c => {
  if (!c.width || !c.height) return false;
  const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
  for (let i = 3; i < d.length; i += 4 * 97) if (d[i] > 0) return true;
  return false;
})
"""
_TEXT_JS = "document.querySelector('.lsf-main-view, .lsf-main-content')?.innerText ?? ''"
# The failure types checked when the labeling screen opens (the model's guess, pre-selected).
_SELECTED_JS = """
Array.from(document.querySelectorAll('.lsf-choices input:checked'))
  .map(i => (i.closest('label')?.innerText ?? i.value ?? '').trim())
"""


@dataclass(frozen=True)
class Screens:
    """What the screenshots show."""

    queue: Path
    labeling: Path
    width: int
    height: int
    #: The engineer queue's columns, left to right, as Label Studio names them
    #: (`tasks:data.image`, `tasks:id`, ...).
    columns: list[str]
    #: How many wafers the first page of the queue lists.
    rows: int
    #: The failure-type choices and the wafer picture on the labeling screen (None: not found).
    choices: Box | None
    picture: Box | None
    #: Whether each is wholly in sight without scrolling (not below the fold, not covered).
    choices_in_sight: bool
    picture_in_sight: bool
    #: The labeling screen's text (the headers, the choices, ...).
    labeling_text: str = field(repr=False)
    #: The failure types checked when the screen opened (Label Studio pre-selects the
    #: prediction's choice: the model's guess), as their labels read.
    selected: list[str] = field(default_factory=list)


def take_screenshots(
    url: str,
    email: str,
    password: str,
    project: str,
    out: Path,
    *,
    tab: str = ENGINEER_VIEW,
    width: int = 1600,
    height: int = 1000,
    executable: str | None = None,
) -> Screens:
    """Log in, then screenshot the tab `tab` of `project` (a title or an id) and its labeling
    stream into `out` (QUEUE_PNG, LABELING_PNG). Raises BrowserError saying which step failed."""
    url = url.rstrip("/")
    out.mkdir(parents=True, exist_ok=True)
    with HeadlessChromium.launch(width=width, height=height, executable=executable) as page:
        page.timeout = PAGE_TIMEOUT
        _log_in(page, url, email, password)
        project_id = _project_id(page, project)
        view = _view_id(page, project_id, tab)
        page.goto(f"{url}/projects/{project_id}/data?tab={view}")
        page.wait_for(_ROWS_JS, f"the rows of tab {tab!r}")
        page.wait_for(_THUMBS_READY_JS, "the wafer thumbnails")
        columns = page.evaluate(_HEADERS_JS)
        rows = int(page.evaluate(_ROWS_JS))
        queue = page.screenshot(out / QUEUE_PNG)

        page.goto(f"{url}/projects/{project_id}/data?tab={view}&labeling=1")
        page.wait_for(_EDITOR_READY_JS, "the labeling screen (picture and failure types)")
        page.wait_for(_PICTURE_DRAWN_JS, "the wafer picture drawn on the labeling screen")
        labeling = page.screenshot(out / LABELING_PNG)
        return Screens(
            queue=queue,
            labeling=labeling,
            width=width,
            height=height,
            columns=list(columns),
            rows=rows,
            choices=page.box(CHOICES),
            picture=page.box(PICTURE),
            choices_in_sight=page.shows(CHOICES),
            picture_in_sight=page.shows(PICTURE),
            labeling_text=str(page.evaluate(_TEXT_JS)),
            selected=[str(x) for x in page.evaluate(_SELECTED_JS) or []],
        )


def _log_in(page: HeadlessChromium, url: str, email: str, password: str) -> None:
    page.goto(f"{url}/user/login/")
    page.wait_for("!!document.querySelector('input[name=email]')", "the login form")
    page.evaluate(
        "(() => { const f = document.querySelector('input[name=email]').form;"
        f" f.email.value = {json.dumps(email)}; f.password.value = {json.dumps(password)};"
        " f.submit(); })()"
    )
    where = page.wait_for(
        "document.readyState === 'complete' && (!location.pathname.startsWith('/user/login')"
        " || document.querySelector('#login-form .error')) && location.pathname",
        "the page after logging in",
    )
    if str(where).startswith("/user/login"):
        raise BrowserError(f"Label Studio at {url} refused the login of {email}")


def _fetch_json(page: HeadlessChromium, path: str) -> object:
    """GET a Label Studio API path with the page's session cookie."""
    answer = page.evaluate(
        f"fetch({json.dumps(path)}).then(r => r.ok ? r.json() : {{failed: r.status}})"
    )
    if isinstance(answer, dict) and "failed" in answer:
        raise BrowserError(f"GET {path} answered HTTP {answer['failed']}")
    return answer


def _project_id(page: HeadlessChromium, project: str) -> int:
    if project.isdigit():
        return int(project)
    found = _fetch_json(page, f"/api/projects/?title={quote(project)}&page_size=100")
    results = found.get("results", []) if isinstance(found, dict) else []
    ids = [p["id"] for p in results if p.get("title") == project]
    if not ids:
        raise BrowserError(f"there is no Label Studio project titled {project!r}")
    return int(ids[0])


def _view_id(page: HeadlessChromium, project: int, tab: str) -> int:
    found = _fetch_json(page, f"/api/dm/views/?project={project}")
    views = found if isinstance(found, list) else []
    ids = [v["id"] for v in views if (v.get("data") or {}).get("title") == tab]
    if not ids:
        titles = ", ".join(repr((v.get("data") or {}).get("title")) for v in views)
        raise BrowserError(f"project {project} has no tab {tab!r} (it has {titles or 'none'})")
    return int(ids[0])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m backend.harness.screenshots",
        description="Screenshot the engineer queue tab and the labeling screen in Label Studio "
        "with a headless Chromium (Debian: apt-get install chromium).",
    )
    parser.add_argument("--project", required=True, help="project title or id")
    parser.add_argument(
        "--logins",
        type=Path,
        help="a logins JSON as scripts/demo writes (runs/demo/logins.json): url and accounts",
    )
    parser.add_argument("--user", default="engineer", help="which account of --logins")
    parser.add_argument("--url", help="Label Studio URL (instead of --logins)")
    parser.add_argument("--email", help="login e-mail (instead of --logins)")
    parser.add_argument(
        "--password-file", type=Path, help="a file holding the password (instead of --logins)"
    )
    parser.add_argument("--tab", default=ENGINEER_VIEW, help="the Data Manager tab to open")
    parser.add_argument("--out", type=Path, default=Path("screenshots"))
    parser.add_argument("--width", type=int, default=1600)
    parser.add_argument("--height", type=int, default=1000)
    parser.add_argument("--chromium", help="the Chromium executable (default: from PATH)")
    args = parser.parse_args(argv)
    if args.logins is not None:
        logins = json.loads(args.logins.read_text())
        if args.user not in logins:
            parser.error(f"{args.logins} has no account {args.user!r}")
        url, email, password = (
            logins["url"],
            logins[args.user]["email"],
            logins[args.user]["password"],
        )
    elif args.url and args.email and args.password_file:
        url, email = args.url, args.email
        password = args.password_file.read_text().strip()
    else:
        parser.error("give --logins FILE, or --url, --email and --password-file")
    try:
        screens = take_screenshots(
            url,
            email,
            password,
            args.project,
            args.out,
            tab=args.tab,
            width=args.width,
            height=args.height,
            executable=args.chromium,
        )
    except BrowserError as exc:
        print(f"screenshots failed: {exc}", file=sys.stderr)
        return 1
    print(f"{screens.queue}: tab {args.tab!r}, {screens.rows} rows, columns {screens.columns}")
    fits = "fit" if screens.choices_in_sight and screens.picture_in_sight else "DO NOT fit"
    print(f"{screens.labeling}: picture and failure types {fits} in {args.width}x{args.height}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
