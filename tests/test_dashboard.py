"""The dashboard in a real headless Chromium (Debian's `chromium`, driven by Playwright).

A person signs in with a key, hands a task to the echo agent, watches its output arrive,
approves the deliverable in the tray and sees the task land in the done column. Screenshots
go to test-artifacts/ for a human to look at.
"""

from __future__ import annotations

import json
import re
import uuid
from pathlib import Path
from urllib.parse import urlparse

import pytest


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
    """A browser tab on one server that fails the test on a script error or a request leaving the server."""

    def __init__(self, browser, base_url: str):
        self.base_url = base_url
        self.context = browser.new_context(viewport={"width": 1680, "height": 1050}, device_scale_factor=1)
        self.context.set_default_timeout(TIMEOUT_MS)
        self.errors: list[str] = []
        self.foreign: list[str] = []
        self.context.route("**/*", self._only_the_server)
        self.tab = self.context.new_page()
        self.tab.on("pageerror", lambda error: self.errors.append(str(error)))

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

    def open_(base_url: str) -> Page:
        opened.append(Page(browser, base_url))
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


def test_a_task_from_creation_to_done(shared_server, open_page):
    seeded = seed(shared_server.client())
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
