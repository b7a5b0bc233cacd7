"""The dashboard in a real headless Chromium (Debian's `chromium`, driven by Playwright).

A person signs in with a key, hands a task to the echo agent, watches its output arrive,
approves the deliverable in the tray and sees the task land in the done column. Screenshots
go to test-artifacts/ for a human to look at.
"""

from __future__ import annotations

import json
import os
import re
import uuid
from pathlib import Path
from urllib.parse import urlparse

import pytest

from tests.api_helpers import wait_for


CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
TIMEOUT_MS = 15_000
UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")

playwright = pytest.importorskip("playwright.sync_api", reason="playwright is not installed: run scripts/test")
pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(),
    reason="Debian's chromium is not at /usr/bin/chromium: scripts/test installs it with apt-get when run as root",
)
expect = playwright.expect


@pytest.fixture(scope="module")
def browser():
    with playwright.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


class Page:
    """A browser tab on one server that fails the test on a script error or a request leaving the server;
    `requests` holds every request the page made ("GET /api/mission-control/me")."""

    def __init__(self, browser, base_url: str, width: int = 1680, height: int = 1050, scheme: str = "dark"):
        self.base_url = base_url
        # Reduced motion: a row fading in is half transparent, and axe would judge its contrast mid-fade.
        self.context = browser.new_context(viewport={"width": width, "height": height}, device_scale_factor=1,
                                           color_scheme=scheme, reduced_motion="reduce")
        self.context.set_default_timeout(TIMEOUT_MS)
        self.errors: list[str] = []
        self.foreign: list[str] = []
        self.requests: list[str] = []
        self.context.route("**/*", self._only_the_server)
        self.tab = self.context.new_page()
        self.tab.on("pageerror", lambda error: self.errors.append(str(error)))
        self.tab.on("request", lambda r: self.requests.append(f"{r.method} {urlparse(r.url).path}"))

    def _only_the_server(self, route) -> None:
        url = route.request.url
        if url.startswith(self.base_url) or urlparse(url).scheme == "data":
            route.continue_()
        else:
            self.foreign.append(url)
            route.abort()

    def sign_in(self, token: str) -> None:
        self.tab.goto(self.base_url + "/")
        self.tab.get_by_label("API key").fill(token)
        self.tab.get_by_role("button", name="Sign in").click()
        expect(self.tab.get_by_test_id("connection")).to_have_attribute("data-state", "live")

    def column(self, status: str):
        return self.tab.get_by_test_id(f"column-{status}")

    def card(self, task_id: str, status: str):
        return self.column(status).locator(f"[data-testid=task-card][data-task-id='{task_id}']")

    def close(self) -> None:
        self.context.close()
        assert not self.errors, f"script errors on the page: {self.errors}"
        assert not self.foreign, f"the page fetched from outside the service: {self.foreign}"


@pytest.fixture
def open_page(browser):
    opened: list[Page] = []

    def open_(base_url: str, **view) -> Page:
        opened.append(Page(browser, base_url, **view))
        return opened[-1]

    yield open_
    for page in opened:
        page.close()


def screenshot(page: Page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.tab.screenshot(path=str(ARTIFACTS / name))


def seed(client) -> dict[str, str]:
    """A task in each status the board shows, made through the API: the status -> the task's id."""

    def task(title: str, run: bool = True, **fields) -> str:
        made = client.post("/tasks", json={"type": "prompt", "title": title, "content": title, **fields}).json()
        if run:
            assert client.post(f"/tasks/{made['id']}/run").status_code == 200
        return made["id"]

    seeded = {
        "pending": task("Verify last night's backups", run=False, priority=8),
        "running": task("Translate the release notes", metadata={"echo": {"delayMs": 600_000}}),
        "review": task("Draft the incident postmortem", requiresApproval=True),
        "done": task("Summarise open support tickets"),
        "failed": task("Rotate staging credentials", metadata={"echo": {"fail": "vault token expired"}}),
        "cancelled": task("Migrate the DNS zone", run=False),
    }
    assert client.post(f"/tasks/{seeded['cancelled']}/cancel", json={"reason": "postponed"}).status_code == 200
    return seeded


@pytest.fixture(scope="module")
def seeded(shared_server) -> dict[str, str]:
    """The module's server with a task in each status, made once: its running task holds a slot throughout."""
    return seed(shared_server.client())


def test_a_task_from_creation_to_done(shared_server, seeded, open_page):
    page = open_page(shared_server.base_url)
    tab = page.tab
    page.sign_in(shared_server.admin_token)
    for status, task_id in seeded.items():
        expect(page.card(task_id, status)).to_be_visible()

    form = tab.get_by_test_id("create-form")
    form.get_by_label("Title").fill("Summarise the launch checklist")
    form.get_by_label("Content").fill("Check fuel, check comms, check the weather, then go.")
    form.get_by_label("Metadata").fill(json.dumps({"echo": {"delayMs": 2400, "chunks": 8}}))
    form.get_by_label("Requires approval").check()
    expect(form.get_by_label("Agent")).to_have_value(
        tab.evaluate("document.querySelector('[data-testid=agent-select] option').value")
    )
    form.get_by_test_id("create-run").click()

    # The new task's panel opens; record every state of its output to see it arrive in pieces.
    panel = tab.get_by_test_id("task-panel")
    expect(panel).to_be_visible()
    expect(panel).to_have_attribute("data-task-id", UUID)
    task_id = panel.get_attribute("data-task-id")
    # The panel sits beside the board and the tray, covering neither.
    board, drawer, tray = (tab.get_by_test_id(name).bounding_box() for name in ("board", "task-panel", "approvals"))
    assert board["x"] + board["width"] <= drawer["x"] and drawer["x"] + drawer["width"] <= tray["x"], (board, drawer, tray)
    tab.evaluate("""() => {
        const output = document.querySelector('[data-testid=task-output]');
        window.outputStates = [output.textContent];
        new MutationObserver(() => window.outputStates.push(output.textContent))
            .observe(output, {childList: true, characterData: true, subtree: true});
    }""")
    expect(page.card(task_id, "running")).to_be_visible()

    expected = "Summarise the launch checklist\n\nCheck fuel, check comms, check the weather, then go."
    expect(tab.get_by_test_id("task-output")).to_have_text(expected)
    states = [s for s in tab.evaluate("window.outputStates") if s]
    assert len(set(states)) >= 3, f"the output did not arrive live, in pieces: {states}"
    assert all(later.startswith(earlier) for earlier, later in zip(states, states[1:])), states

    # The deliverable waits in the approval tray; approving it moves the task to done.
    approval = tab.locator(f"[data-testid=approval][data-task-id='{task_id}']")
    expect(approval).to_be_visible()
    expect(page.card(task_id, "review")).to_be_visible()
    done_before = int(page.column("done").locator("[data-count=done]").inner_text())
    approval.get_by_label("Feedback").fill("Looks right; ship it.")
    approval.get_by_role("button", name="Approve").click()
    expect(page.card(task_id, "done")).to_be_visible()
    expect(page.column("done").locator("[data-count=done]")).to_have_text(str(done_before + 1))
    expect(approval).to_have_count(0)
    expect(panel.locator("[data-field=status]")).to_have_text("Done")
    # Its one run, and the desktop it ran on.
    run = panel.get_by_test_id("task-run")
    expect(run).to_have_count(1)
    expect(run).to_have_attribute("data-status", "done")
    expect(run.locator("[data-field=desktop]")).to_have_text("on local")

    # The timeline shows every event of the task, each with who did it and when.
    events = shared_server.client().get(f"/tasks/{task_id}/events").json()
    timeline = tab.get_by_test_id("timeline-event")
    expect(timeline).to_have_count(len(events))
    for item, event in zip(timeline.all(), events):
        expect(item.locator(".event-type")).to_have_text(event["type"])
        expect(item.locator("[data-field=actor]")).to_have_text(event["meta"]["actor"])
        expect(item.locator("time")).to_have_attribute("datetime", event["recordedAt"])
    resolved = timeline.filter(has_text="approval.resolved")
    expect(resolved).to_contain_text("Looks right; ship it.")
    expect(resolved.locator("[data-field=actor]")).to_have_text("admin")
    expect(tab.get_by_test_id("activity")).to_contain_text("task.completed")
    expect(tab.get_by_test_id("overview").locator("[data-stat=head]")).not_to_have_text("–")

    screenshot(page, "dashboard-task-panel.png")
    panel.get_by_role("button", name="Close").click()
    expect(panel).to_be_hidden()
    screenshot(page, "dashboard.png")


def test_text_from_the_api_is_shown_as_text_never_as_markup(shared_server, open_page):
    hostile = '<img src=x onerror="window.pwned=1"><b>bold</b>'
    task = shared_server.client().post("/tasks", json={"type": "prompt", "title": hostile, "content": hostile}).json()
    page = open_page(shared_server.base_url)
    page.sign_in(shared_server.admin_token)
    card = page.card(task["id"], "pending")
    expect(card.locator(".card-title")).to_have_text(hostile)
    card.click()
    expect(page.tab.get_by_test_id("task-panel").locator("[data-field=title]")).to_have_text(hostile)
    assert page.tab.locator("[data-testid=board] img, [data-testid=task-panel] img, [data-testid=board] b").count() == 0
    assert page.tab.evaluate("window.pwned") is None


def test_the_feed_keeps_presence_out_unless_asked_and_names_devices(shared_server, open_page):
    client = shared_server.client()
    task = client.post("/tasks", json={"type": "prompt", "title": "Watched closely", "content": "x"}).json()
    page = open_page(shared_server.base_url)
    tab = page.tab
    page.sign_in(shared_server.admin_token)
    page.card(task["id"], "pending").click()  # an open panel marks this tab's presence
    device = tab.evaluate("sessionStorage.getItem('mc.deviceId')")
    assert re.fullmatch(r"Chrome on Linux · tab \d+ · \w{4}", device), device
    script_device = str(uuid.uuid4())
    assert client.post("/devices", json={"deviceId": script_device, "kind": "browser"}).status_code == 201
    assert client.post(f"/tasks/{task['id']}/presence", json={"deviceId": script_device}).status_code == 204
    # Waiting through the page (Playwright serves its requests only while the test waits on it).
    facts = tab.get_by_test_id("task-panel").locator("[data-field=facts]")
    expect(facts).to_contain_text(device)
    expect(facts).to_contain_text(f"device {script_device[:8]}")
    assert sorted(client.get(f"/tasks/{task['id']}").json()["watchers"]) == sorted([device, script_device])
    client.post("/tasks", json={"type": "prompt", "title": "After the presence", "content": "y"})
    feed = tab.get_by_test_id("activity")
    # Once an event after them is shown, the presence events have reached the page too.
    expect(feed.locator(".feed-item", has_text="After the presence")).to_be_visible()
    types = feed.locator(".feed-item:visible .event-type").all_inner_texts()
    assert "task.created" in types and not [t for t in types if t.startswith("presence.")], types
    logged = client.get("/events", params={"types": "presence.marked", "limit": 500}).json()["events"]
    assert {device, script_device} <= {e["payload"]["deviceId"] for e in logged}  # still in the log

    feed.get_by_test_id("feed-presence-toggle").check()
    rows = feed.locator(".feed-item:visible", has_text="presence.marked")
    expect(rows.filter(has_text=device)).to_have_count(1)
    expect(rows.filter(has_text=f"device {script_device[:8]}")).to_have_count(1)
    assert script_device not in feed.inner_text()
    tab.reload()  # the choice is kept
    expect(tab.get_by_test_id("feed-presence-toggle")).to_be_checked()


def test_sign_in_refuses_a_wrong_key_and_keeps_a_good_one_for_the_tab_only(shared_server, open_page):
    page = open_page(shared_server.base_url)
    tab = page.tab
    tab.goto(shared_server.base_url + "/")
    tab.get_by_label("API key").fill("mc_not-a-key")
    tab.get_by_role("button", name="Sign in").click()
    expect(tab.get_by_test_id("signin-error")).to_contain_text("not known")

    page.sign_in(shared_server.admin_token)
    assert tab.evaluate("sessionStorage.getItem('mc.apiKey')") == shared_server.admin_token
    assert shared_server.admin_token not in tab.evaluate("JSON.stringify(localStorage)")
    tab.reload()
    expect(tab.get_by_test_id("connection")).to_have_attribute("data-state", "live")

    tab.get_by_role("button", name="Sign out").click()
    expect(tab.get_by_label("API key")).to_be_visible()
    assert tab.evaluate("sessionStorage.getItem('mc.apiKey')") is None


def test_it_shows_a_lost_connection_and_resumes_by_itself(server, open_page):
    page = open_page(server.base_url)
    page.sign_in(server.admin_token)
    connection = page.tab.get_by_test_id("connection")

    server.stop()
    expect(connection).not_to_have_attribute("data-state", "live")
    expect(connection).to_contain_text(re.compile("Reconnecting|Disconnected"))
    form = page.tab.get_by_test_id("create-form")
    form.get_by_label("Content").fill("while the server is down")
    form.get_by_role("button", name="Create", exact=True).click()
    expect(form.get_by_test_id("create-error")).to_have_text(
        "The server cannot be reached. Check that it is running, then try again.")
    server.start()
    expect(connection).to_have_attribute("data-state", "live", timeout=30_000)

    task = server.client().post("/tasks", json={"type": "prompt", "content": "after the restart"}).json()
    expect(page.card(task["id"], "pending")).to_be_visible()


def test_the_desktops_panel_lists_each_desktop_with_its_status_and_load(shared_server, open_page):
    page = open_page(shared_server.base_url)
    page.sign_in(shared_server.admin_token)
    shown = page.tab.get_by_test_id("desktops").get_by_test_id("desktop")
    desktops = shared_server.client().get("/desktops").json()
    assert desktops, "a node runs a desktop of its own"
    expect(shown).to_have_count(len(desktops))
    for item, desktop in zip(shown.all(), desktops):
        expect(item).to_have_attribute("data-status", desktop["status"])
        expect(item.locator(".desktop-name")).to_have_text(desktop["id"])
        expect(item).to_contain_text(f"/{desktop['capacity']}")


def test_the_queue_column_shows_positions_and_a_priority_set_there_moves_a_task(make_server, open_page):
    server = make_server(MC_MAX_CONCURRENT="1")
    client = server.client()

    def task(title: str, **run) -> str:
        made = client.post("/tasks", json={"type": "prompt", "title": title, "content": title,
                                          "metadata": {"echo": {"delayMs": 600_000}}}).json()
        assert client.post(f"/tasks/{made['id']}/run", json=run).status_code == (202 if run else 200)
        return made["id"]

    task("Hold the only slot")
    first, second = task("Queued first", queue=True), task("Queued second", queue=True)
    page = open_page(server.base_url)
    page.sign_in(server.admin_token)
    position = lambda task_id: page.card(task_id, "queued").get_by_test_id("queue-position")  # noqa: E731
    expect(position(first)).to_have_text("#1")
    expect(position(second)).to_have_text("#2")

    page.card(second, "queued").click()
    panel = page.tab.get_by_test_id("task-panel")
    panel.get_by_test_id("priority-input").fill("9")
    panel.get_by_role("button", name="Set priority").click()
    expect(position(second)).to_have_text("#1")
    expect(position(first)).to_have_text("#2")
    assert client.get(f"/tasks/{first}").json()["queuePosition"] == 2
    screenshot(page, "dashboard-queue.png")


AXE = Path(__file__).resolve().parent / "browser" / "node_modules" / "axe-core" / "axe.min.js"


def serious_violations(page: Page) -> list[dict]:
    """axe-core's serious and critical findings on the page as it stands, each with a few of its elements."""
    page.tab.add_script_tag(path=str(AXE))
    return page.tab.evaluate("""async () => (await axe.run(document, {resultTypes: ['violations']})).violations
        .filter(v => v.impact === 'serious' || v.impact === 'critical')
        .map(v => ({id: v.id, impact: v.impact, nodes: v.nodes.slice(0, 4).map(n => n.target.join(' ') + ' — ' + n.failureSummary)}))""")


@pytest.mark.skipif(not AXE.exists(), reason="axe-core is not installed: scripts/test installs it with npm ci --prefix tests/browser")
@pytest.mark.parametrize("scheme", ["dark", "light"])
@pytest.mark.parametrize("width,height", [(390, 844), (1440, 900)])
def test_the_page_is_accessible_and_fits_at_a_phone_and_a_laptop_width(shared_server, seeded, open_page, scheme, width, height):
    if os.environ.get("MC_TEST_BACKEND") == "postgres":
        pytest.skip("the page's accessibility and layout do not depend on the log's backend: checked on the SQLite pass")
    page = open_page(shared_server.base_url, width=width, height=height, scheme=scheme)
    tab = page.tab
    page.sign_in(shared_server.admin_token)
    expect(tab.get_by_test_id("task-card").first).to_be_visible()
    assert tab.evaluate("matchMedia('(prefers-color-scheme: light)').matches") == (scheme == "light")
    found = {"board": serious_violations(page)}
    # Nothing is wider than the screen; the form's fields and the overview stay on it.
    assert tab.evaluate("document.documentElement.scrollWidth") == width
    form = tab.get_by_test_id("create-form")
    assert form.get_by_label("Title").bounding_box()["width"] >= min(300, width - 60)
    priority = form.get_by_label("Priority").bounding_box()
    assert priority["x"] >= 0 and priority["x"] + priority["width"] <= width
    expect(tab.get_by_test_id("overview").locator("[data-stat=runs]")).to_be_visible()
    if width >= 1440:  # columns wide enough that a title of four words keeps to two lines at most
        titles = tab.locator(", ".join(f"[data-task-id='{task_id}'] .card-title" for task_id in seeded.values()))
        heights = titles.evaluate_all("els => els.map(e => e.getBoundingClientRect().height / parseFloat(getComputedStyle(e).lineHeight))")
        assert max(heights) <= 2.05, heights
    tab.get_by_test_id("task-card").first.click()
    expect(tab.get_by_test_id("timeline-event").first).to_be_visible()
    found["panel"] = serious_violations(page)
    tab.get_by_role("button", name="Close").click()
    for view in ("Agents", "Desktops", "Audit"):
        tab.get_by_test_id("views").get_by_role("button", name=view).click()
        expect(tab.locator(f"[data-view-panel={view.lower()}]")).to_be_visible()
        found[view.lower()] = serious_violations(page)
    screenshot(page, f"dashboard-{width}-{scheme}.png")
    assert not any(found.values()), json.dumps(found, indent=1)


def wait_status(client, task_id: str, status: str) -> None:
    wait_for(lambda: client.get(f"/tasks/{task_id}").json()["status"] == status, what=f"the task to reach {status}")


def test_message_cancel_retry_and_review_from_the_task_panel(shared_server, open_page):
    client = shared_server.client()
    page = open_page(shared_server.base_url)
    tab = page.tab
    page.sign_in(shared_server.admin_token)
    panel = tab.get_by_test_id("task-panel")
    status = panel.locator("[data-field=status]")

    # A run that asks a question waits for the answer: the panel's message box sends it.
    form = tab.get_by_test_id("create-form")
    form.get_by_label("Content").fill("Which colour?")
    form.get_by_label("Metadata").fill(json.dumps({"echo": {"ask": "Which colour?"}}))
    form.get_by_test_id("create-run").click()
    expect(status).to_have_text("Needs input")
    expect(panel.locator("[data-fact=asks]")).to_have_text("Which colour?")
    panel.get_by_label("Message").fill("Blue, please")
    panel.get_by_role("button", name="Send").click()
    expect(status).to_have_text("Done")
    expect(tab.get_by_test_id("task-output")).to_contain_text("Blue, please")
    expect(panel.get_by_test_id("timeline-event").filter(has_text="task.message")).to_contain_text("Blue, please")

    # Cancel asks first, takes a reason; Retry brings the task back to pending.
    long = client.post("/tasks", json={"type": "prompt", "title": "Long haul", "content": "x",
                                       "metadata": {"echo": {"delayMs": 600_000}}}).json()
    assert client.post(f"/tasks/{long['id']}/run").status_code == 200
    page.card(long["id"], "running").click()
    expect(panel).to_have_attribute("data-task-id", long["id"])
    panel.get_by_role("button", name="Cancel", exact=True).click()
    confirm = panel.get_by_test_id("cancel-confirm")
    expect(confirm).to_be_visible()
    expect(status).to_have_text("Running")  # nothing happens before the confirmation
    confirm.get_by_label("Reason").fill("no longer needed")
    confirm.get_by_role("button", name="Yes, cancel it").click()
    expect(page.card(long["id"], "cancelled")).to_be_visible()
    expect(status).to_have_text("Cancelled")
    expect(panel.get_by_test_id("timeline-event").filter(has_text="task.cancelled")).to_contain_text("no longer needed")
    panel.get_by_role("button", name="Retry").click()
    expect(page.card(long["id"], "pending")).to_be_visible()
    assert client.get(f"/tasks/{long['id']}").json()["status"] == "pending"

    # A deliverable reviewed from the task's own panel: rejected with feedback, it fails.
    review = client.post("/tasks", json={"type": "prompt", "title": "Short essay", "content": "Write",
                                         "requiresApproval": True}).json()
    assert client.post(f"/tasks/{review['id']}/run").status_code == 200
    page.card(review["id"], "review").click()
    expect(panel).to_have_attribute("data-task-id", review["id"])
    panel.get_by_label("Feedback").fill("Too short")
    panel.get_by_role("button", name="Reject").click()
    expect(page.card(review["id"], "failed")).to_be_visible()
    expect(tab.locator(f"[data-testid=approval][data-task-id='{review['id']}']")).to_have_count(0)
    assert client.get(f"/tasks/{review['id']}").json()["error"] == "rejected: Too short"
    # Timeline times carry their date.
    expect(panel.get_by_test_id("timeline-event").first.locator("time")).to_have_text(
        re.compile(r"^([A-Z][a-z]{2} \d{1,2}|\d{1,2} [A-Z][a-z]{2}\.?)(, \d{4})? \d\d:\d\d:\d\d\.\d{3}$"))


def test_search_filters_projects_paging_and_the_archive(shared_server, open_page):
    client = shared_server.client()
    word = f"orbit{uuid.uuid4().hex[:6]}"
    for n in range(100):
        assert client.post("/tasks", json={"type": "prompt", "content": f"{word} check {n}"}).status_code == 201
    done = client.post("/tasks", json={"type": "prompt", "title": f"{word} alpha", "content": "go"}).json()
    assert client.post(f"/tasks/{done['id']}/run").status_code == 200
    wait_status(client, done["id"], "done")
    project = client.post("/projects", json={"name": f"Apollo {word}"}).json()
    apollo = client.post("/tasks", json={"type": "prompt", "title": f"{word} in apollo", "content": "x",
                                         "projectId": project["id"]}).json()
    page = open_page(shared_server.base_url)
    tab = page.tab
    page.sign_in(shared_server.admin_token)
    cards = tab.get_by_test_id("board").get_by_test_id("task-card")
    shown = tab.get_by_test_id("board-status").locator("[data-field=shown]")

    tab.keyboard.press("/")  # the search box's key
    expect(tab.get_by_test_id("search")).to_be_focused()
    tab.keyboard.type(word.upper())  # as the API searches: regardless of case
    pending = page.column("pending").locator("[data-count=pending]")
    expect(shown).to_contain_text("Showing 100 of 102 tasks")
    expect(pending).to_have_text("99")  # the newest 100: one of them done
    tab.get_by_test_id("load-more").click()
    expect(shown).to_have_text("102 tasks")
    expect(pending).to_have_text("101")
    expect(tab.get_by_test_id("load-more")).to_be_hidden()

    filters = tab.get_by_test_id("filters")
    filters.get_by_label("Status").select_option("done")
    expect(cards).to_have_count(1)
    expect(page.card(done["id"], "done")).to_be_visible()
    filters.get_by_label("Status").select_option("")
    filters.get_by_label("Agent").select_option(label="echo")  # only a task that ran has an agent
    expect(cards).to_have_count(1)
    filters.get_by_label("Agent").select_option("")
    filters.get_by_label("Project").select_option(label=f"Apollo {word}")
    expect(cards).to_have_count(1)
    expect(page.card(apollo["id"], "pending")).to_be_visible()
    filters.get_by_label("Project").select_option("")
    expect(shown).to_contain_text("Showing 100 of 102 tasks")

    # Archived: out of the board, into the archived view, and back.
    filters.get_by_label("Status").select_option("done")
    page.card(done["id"], "done").click()
    tab.get_by_test_id("task-panel").get_by_role("button", name="Archive").click()
    expect(cards).to_have_count(0)
    expect(shown).to_have_text("No tasks match these filters.")
    filters.get_by_label("Archived").check()
    expect(page.card(done["id"], "done")).to_be_visible()
    page.card(done["id"], "done").click()
    tab.get_by_test_id("task-panel").get_by_role("button", name="Unarchive").click()
    expect(cards).to_have_count(0)
    filters.get_by_label("Archived").uncheck()
    expect(page.card(done["id"], "done")).to_be_visible()
    assert client.get(f"/tasks/{done['id']}").json()["archived"] is False
    # Every feed row names its task, wherever the task was made.
    feed = tab.get_by_test_id("activity").locator(".feed-subject")
    expect(feed.filter(has_text=re.compile(r"^(task [0-9a-f]{8}|a task)$"))).to_have_count(0)


def test_agents_and_a_command_task_on_a_shell_agent(shared_server, open_page):
    page = open_page(shared_server.base_url)
    tab = page.tab
    page.sign_in(shared_server.admin_token)
    form = tab.get_by_test_id("create-form")
    form.get_by_label("Type").select_option("command")
    expect(form.get_by_test_id("agent-hint")).to_contain_text("No shell agent")

    tab.get_by_test_id("views").get_by_role("button", name="Agents").click()
    register = tab.get_by_test_id("agent-form")
    register.get_by_label("Name").fill("sh-1")
    register.get_by_label("Kind").select_option("shell")
    register.get_by_role("button", name="Register").click()
    row = tab.get_by_test_id("agent").filter(has_text="sh-1")
    expect(row).to_have_attribute("data-status", "active")
    row.get_by_role("button", name="Pause sh-1").click()
    expect(row).to_have_attribute("data-status", "paused")
    row.get_by_role("button", name="Resume sh-1").click()
    expect(row).to_have_attribute("data-status", "active")
    shell = row.get_attribute("data-agent-id")

    tab.get_by_test_id("views").get_by_role("button", name="Board").click()
    expect(form.get_by_label("Agent")).to_have_value(shell)  # a command goes to the shell
    expect(form.get_by_test_id("agent-hint")).to_be_hidden()
    form.get_by_label("Content").fill("echo from-the-shell; ls /")
    form.get_by_test_id("create-run").click()
    panel = tab.get_by_test_id("task-panel")
    expect(panel.locator("[data-field=status]")).to_have_text("Done")
    expect(tab.get_by_test_id("task-output")).to_contain_text("from-the-shell")
    expect(tab.get_by_test_id("task-output")).not_to_contain_text("echo from-the-shell")
    expect(form.get_by_label("Type")).to_have_value("prompt")  # the form is cleared for the next task


def test_desktops_and_the_audit_view(shared_server, open_page):
    client = shared_server.client()
    task = client.post("/tasks", json={"type": "prompt", "title": "Audited", "content": "x"}).json()
    assert client.patch(f"/tasks/{task['id']}", json={"priority": 9}).status_code == 200
    page = open_page(shared_server.base_url)
    tab = page.tab
    page.sign_in(shared_server.admin_token)
    views = tab.get_by_test_id("views")

    views.get_by_role("button", name="Desktops").click()
    local = tab.locator("[data-testid=desktop-row][data-desktop-id=local]")
    expect(local).to_have_attribute("data-status", "online")
    local.get_by_role("button", name="Drain local").click()
    expect(local).to_have_attribute("data-status", "draining")
    local.get_by_role("button", name="Resume local").click()
    expect(local).to_have_attribute("data-status", "online")
    assert client.get("/desktops/local").json()["status"] == "online"

    views.get_by_role("button", name="Audit").click()
    audit = tab.get_by_test_id("audit-view")
    audit.get_by_role("button", name="Verify the chain").click()
    head = client.get("/audit/digest").json()["position"]
    expect(audit.get_by_test_id("verify-result")).to_contain_text(re.compile(r"Intact: \d+ events checked"))
    audit.get_by_role("button", name="Take the digest").click()
    expect(audit.get_by_test_id("digest-result")).to_contain_text(re.compile(r"#\d+ [0-9a-f]{64}"))
    digest = audit.get_by_test_id("digest-result").inner_text()
    position, hash_ = re.search(r"#(\d+) ([0-9a-f]{64})", digest).groups()
    assert int(position) >= head
    assert client.get("/events", params={"after": int(position) - 1, "limit": 1}).json()["events"][0]["hash"] == hash_
    expect(audit.get_by_test_id("log-event").first).to_be_visible()

    # A task's history as of a position: before its priority changed, it was version 1 at priority 5.
    views.get_by_role("button", name="Board").click()
    page.card(task["id"], "pending").click()
    panel = tab.get_by_test_id("task-panel")
    created = panel.get_by_test_id("timeline-event").filter(has_text="task.created")
    created.get_by_role("button", name=re.compile(r"as of #\d+")).click()
    asof = panel.get_by_test_id("asof")
    expect(asof.locator("[data-fact=priority]")).to_have_text("5")
    expect(asof.locator("[data-fact=version]")).to_have_text("1")
    expect(panel.locator("[data-field=facts] [data-fact=priority]")).to_have_text("9")


def test_a_read_only_key_is_offered_only_what_it_can_do(shared_server, open_page):
    admin = shared_server.client()
    held = admin.post("/tasks", json={"type": "prompt", "content": "admin's, in review", "requiresApproval": True}).json()
    assert admin.post(f"/tasks/{held['id']}/run").status_code == 200
    wait_status(admin, held["id"], "review")
    assert admin.get("/overview").json()["approvalsPending"] >= 1
    shared = admin.post("/projects", json={"name": "Readers' corner", "members": ["reader"]}).json()
    admin.post("/tasks", json={"type": "prompt", "title": "For the reader", "content": "x", "projectId": shared["id"]})
    reader = shared_server.token("reader", "task:read")
    page = open_page(shared_server.base_url)
    tab = page.tab
    page.sign_in(reader)
    expect(tab.get_by_test_id("whoami")).to_have_text("reader · task:read")
    expect(tab.get_by_test_id("readonly-note")).to_contain_text("can watch but not create or change tasks or decide approvals")
    expect(tab.get_by_test_id("create-form")).to_be_hidden()
    expect(tab.get_by_test_id("views").get_by_role("button", name="Audit")).to_be_hidden()
    # The header counts this user's tray, not every project's approvals.
    expect(tab.get_by_test_id("overview").locator("[data-stat=approvals]")).to_have_text("0")
    expect(tab.get_by_test_id("approvals")).to_contain_text("No deliverable is waiting")
    mine = shared_server.client(reader).get("/tasks").json()
    expect(tab.get_by_test_id("board").get_by_test_id("task-card")).to_have_count(len(mine))
    assert [t["title"] for t in mine] == ["For the reader"]
    page.card(mine[0]["id"], "pending").click()
    panel = tab.get_by_test_id("task-panel")
    expect(panel.get_by_test_id("timeline-event").first).to_be_visible()
    expect(panel.locator("[data-field=actions] button")).to_have_count(0)
    panel.get_by_role("button", name="Close").click()
    tab.get_by_test_id("views").get_by_role("button", name="Agents").click()
    expect(tab.get_by_test_id("agent-form")).to_be_hidden()
    expect(tab.get_by_test_id("agent-table").get_by_role("button")).to_have_count(0)
    asked = [r for r in page.requests if "/api/" in r]
    # It registers its tab as a device (to be told of its tasks) and changes nothing else.
    assert not [r for r in asked if r.endswith("mission-control/events") or (r.startswith("POST") and not r.endswith("/devices"))], asked
    assert not [r for r in asked if "/presence" in r], asked


def test_at_the_limit_create_and_run_says_the_task_was_made_and_makes_it_once(make_server, open_page):
    server = make_server(MC_MAX_CONCURRENT="1")
    client = server.client()
    holder = client.post("/tasks", json={"type": "prompt", "content": "hold the slot",
                                         "metadata": {"echo": {"delayMs": 600_000}}}).json()
    assert client.post(f"/tasks/{holder['id']}/run").status_code == 200
    page = open_page(server.base_url)
    tab = page.tab
    page.sign_in(server.admin_token)

    # The first create reaches the server but its answer is lost on the way back: the page is told
    # the server cannot be reached, and the same submission sent again makes no second task.
    lost: list[int] = []

    def lose_the_first_answer(route) -> None:
        if route.request.method == "POST" and not lost:
            lost.append(route.fetch().status)
            route.abort()
        else:
            route.fallback()

    tab.route(f"{server.base_url}/api/mission-control/tasks", lose_the_first_answer)
    form = tab.get_by_test_id("create-form")
    form.get_by_label("Title").fill("Second in line")
    form.get_by_label("Content").fill("wait your turn")
    form.get_by_label("Metadata").fill('{"team": "ops"}')
    form.get_by_label("Requires approval").check()
    form.get_by_test_id("create-run").click()
    error = form.get_by_test_id("create-error")
    expect(error).to_have_text("The server cannot be reached. Check that it is running, then try again.")
    assert lost == [201]
    form.get_by_test_id("create-run").click()
    expect(error).to_contain_text("Created “Second in line”, but it did not start: Maximum concurrent tasks (1) reached.")
    expect(error).to_contain_text("It waits in Pending")
    made = [t for t in client.get("/tasks", params={"search": "Second in line"}).json()]
    assert len(made) == 1 and made[0]["status"] == "pending", made
    for field in ("Title", "Content", "Metadata"):
        expect(form.get_by_label(field)).to_have_value("")
    expect(form.get_by_label("Requires approval")).not_to_be_checked()

    # Once a slot frees, the task is run from its panel, and the message goes with the pending state.
    panel = tab.get_by_test_id("task-panel")
    expect(panel).to_have_attribute("data-task-id", made[0]["id"])
    assert client.post(f"/tasks/{holder['id']}/cancel", json={}).status_code == 200
    wait_status(client, holder["id"], "cancelled")
    wait_for(lambda: not client.get("/overview").json()["tasks"]["running"], what="the slot to come free")
    panel.get_by_role("button", name="Run", exact=True).click()
    expect(page.card(made[0]["id"], "review")).to_be_visible()
    expect(error).to_have_text("")


# The page's notifications, as the browser is asked to show them (a notification itself is outside the page).
RECORD_NOTIFICATIONS = """
window.shownNotifications = [];
if (window.Notification) {
  window.Notification = class extends window.Notification {
    constructor(title, options = {}) { super(title, options); window.shownNotifications.push({title, body: options.body}); }
  };
}
"""


def test_a_task_that_ends_while_the_tab_is_in_the_background_is_a_browser_notification(shared_server, open_page):
    page = open_page(shared_server.base_url)
    tab = page.tab
    page.context.grant_permissions(["notifications"], origin=shared_server.base_url)
    page.context.add_init_script(RECORD_NOTIFICATIONS)
    token = shared_server.token("nora", "task:read,task:write")
    nora = shared_server.client(token)
    page.sign_in(token)
    device = tab.evaluate("sessionStorage.getItem('mc.deviceId')")
    toggle = tab.get_by_test_id("notify-toggle")
    toggle.click()
    expect(toggle).to_have_attribute("aria-pressed", "true")
    wait_for(lambda: device in [d["deviceId"] for d in nora.get("/devices").json()], what="the tab to register as a device")

    tab.evaluate("Object.defineProperty(document, 'visibilityState', {configurable: true, get: () => 'hidden'})")
    task = nora.post("/tasks", json={"type": "prompt", "title": "Nightly report", "content": "x"}).json()
    assert nora.post(f"/tasks/{task['id']}/run").status_code == 200
    tab.wait_for_function("window.shownNotifications.some(n => n.body.includes('Nightly report'))")
    # In front, the same news is a message on the page instead.
    tab.evaluate("Object.defineProperty(document, 'visibilityState', {configurable: true, get: () => 'visible'})")
    second = nora.post("/tasks", json={"type": "prompt", "title": "Morning digest", "content": "x"}).json()
    assert nora.post(f"/tasks/{second['id']}/run").status_code == 200
    expect(tab.locator(".toast", has_text="Morning digest")).to_be_visible()
    assert not [n for n in tab.evaluate("window.shownNotifications") if "Morning digest" in n["body"]]


DOT_PNG = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="


def test_the_tray_shows_a_deliverables_artifacts_text_inline_images_as_images_and_files_to_download(shared_server, open_page):
    client = shared_server.client()
    shell = next((a for a in client.get("/agents").json() if a["kind"] == "shell" and a["status"] == "active"), None)
    shell = shell or client.post("/agents", json={"name": "sh-artifacts", "kind": "shell"}).json()
    script = (f"mkdir -p outputs && printf 'All green.\\n' > outputs/notes.txt && echo {DOT_PNG} | base64 -d > outputs/dot.png"
              " && printf '\\001\\002' > outputs/blob.bin")
    task = client.post("/tasks", json={"type": "command", "title": "Build the report", "content": script,
                                       "agentId": shell["id"], "requiresApproval": True}).json()
    assert client.post(f"/tasks/{task['id']}/run").status_code == 200
    wait_status(client, task["id"], "review")
    page = open_page(shared_server.base_url)
    page.sign_in(shared_server.admin_token)
    approval = page.tab.locator(f"[data-testid=approval][data-task-id='{task['id']}']")
    artifacts = approval.get_by_test_id("artifact")
    expect(artifacts).to_have_count(3)
    expect(artifacts.filter(has_text="notes.txt").locator("pre")).to_have_text("All green.\n")
    image = artifacts.locator("img[alt='dot.png']")
    expect(image).to_be_visible()
    page.tab.wait_for_function("img => img.complete && img.naturalWidth === 1", arg=image.element_handle())
    blob = artifacts.filter(has_text="blob.bin")
    expect(blob.locator("pre, img")).to_have_count(0)
    with page.tab.expect_download() as download:
        blob.get_by_role("button", name=re.compile("Download blob.bin")).click()
    assert Path(download.value.path()).read_bytes() == b"\x01\x02"
    assert download.value.suggested_filename == "blob.bin"
    approval.get_by_role("button", name="Build the report").click()  # its panel lists them too
    expect(page.tab.get_by_test_id("task-artifacts").get_by_test_id("artifact")).to_have_count(3)


def test_usage_is_shown_where_the_server_reports_it(shared_server, open_page):
    client = shared_server.client()
    task = client.post("/tasks", json={"type": "prompt", "title": "Counted", "content": "x"}).json()
    assert client.post(f"/tasks/{task['id']}/run").status_code == 200
    wait_status(client, task["id"], "done")
    usage = client.get(f"/tasks/{task['id']}").json()["usage"]
    page = open_page(shared_server.base_url)
    page.sign_in(shared_server.admin_token)
    page.card(task["id"], "done").click()
    tokens = usage["promptTokens"] + usage["completionTokens"]
    expect(page.tab.get_by_test_id("task-panel").locator("[data-fact=usage]")).to_contain_text(f"{tokens:,} tokens")
    expect(page.tab.get_by_test_id("task-panel").locator("[data-fact=usage]")).to_contain_text(f"${usage['costUsd']}")
    overview = client.get("/overview").json()["usage"]
    expect(page.tab.get_by_test_id("overview-cost")).to_have_text(f"${overview['costUsd']}")
