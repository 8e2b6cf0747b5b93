"""Grafana from Python (fedguard/grafana.py) and the annotator's decisions (fedguard/annotator.py).

No Grafana server can be installed on these machines (no package in any reachable registry, no Docker), so this
checks the client side against Grafana's documented HTTP API: :class:`FakeGrafana` is a local, threaded
``http.server`` whose handlers check every request the real grafana-client sends (method, path, auth header, JSON
body: required fields, types, unknown fields) against the pages of Grafana's HTTP API documentation named in
:data:`DOCS`, record it, and answer as those pages show. Requests that break the documented API are recorded in
``violations`` and answered 400, so a test that pushes or annotates also asserts ``violations == []``; the
``test_the_fake_*`` tests show that the checks do reject what the documentation rejects.

What this does not show: that a real Grafana (of some version) accepts the same requests and renders the result.
"""

from __future__ import annotations

import base64
import itertools
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
from grafana_client.client import GrafanaBadInputError, GrafanaClientError, GrafanaServerError

from fedguard import grafana
from fedguard.annotator import (Annotation, Outbox, _Reader, annotations_for_event, backoff, campaign_change,
                                rule_change, since_start)
from fedguard.stack import free_port
from producers.campaign import Campaign

# Where each check comes from (Grafana's HTTP API reference, the legacy /api endpoints every Grafana 9-12 serves).
DOCS = {
    "auth": "https://grafana.com/docs/grafana/latest/developers/http_api/authentication/",
    "folder": "https://grafana.com/docs/grafana/latest/developers/http_api/folder/",
    "dashboard": "https://grafana.com/docs/grafana/latest/developers/http_api/dashboard/#create--update-dashboard",
    "datasource": "https://grafana.com/docs/grafana/latest/developers/http_api/data_source/"
                  "#get-a-single-data-source-by-uid",
    "annotation": "https://grafana.com/docs/grafana/latest/developers/http_api/annotations/#create-annotation",
    # Grafana decodes request bodies with Go's encoding/json: "unmarshaling a JSON null into any other Go type
    # [than interface, map, pointer, slice] has no effect on the value", so null in an optional number field is the
    # same as leaving it out (grafana-client sends "panelId": null and "timeEnd": null).
    "go-null": "https://pkg.go.dev/encoding/json#Unmarshal",
}

TOKEN = "glsa_fedguard_test_token"
USER, PASSWORD = "admin", "s3cret"
EPOCH_MS_2001 = 1_000_000_000_000  # an epoch in ms is above this; one in seconds (a classic bug) is far below
MAX_UID = 40  # folder.md and dashboard.md: "The uid can have a maximum length of 40 characters."


@dataclass
class Seen:
    method: str
    path: str  # without the sub-path prefix
    query: dict[str, list[str]]
    auth: str | None
    body: Any


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int_or_null(value: Any) -> bool:  # DOCS["go-null"]
    return value is None or _is_int(value)


def _str_or_null(value: Any) -> bool:
    return value is None or isinstance(value, str)


@dataclass
class FakeGrafana:
    """A local HTTP server that speaks the part of Grafana's HTTP API fedguard uses, checking each request."""

    datasources: dict[str, str] = field(default_factory=lambda: {"fedguard-prometheus": "prometheus"})
    folders: list[dict[str, Any]] = field(default_factory=list)
    prefix: str = ""  # a sub-path, as when Grafana is served under one (root_url + serve_from_sub_path)
    requests: list[Seen] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)
    dashboards: dict[str, dict[str, Any]] = field(default_factory=dict)
    annotations: list[dict[str, Any]] = field(default_factory=list)
    unknown: list[str] = field(default_factory=list)  # paths outside the API (answered 404)
    outage: int = 0  # answer the next N annotation requests 503, as a Grafana restarting would

    def __post_init__(self) -> None:
        self.lock = threading.Lock()
        self.ids = itertools.count(1)
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _serve(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                status, answer = fake.answer(self.command, self.path, dict(self.headers), raw)
                data = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _serve

            def log_message(self, *args) -> None:  # quiet
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    @property
    def url(self) -> str:
        return self.origin + self.prefix

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def seen(self, method: str, path: str) -> list[Seen]:
        return [r for r in self.requests if r.method == method and r.path == path]

    # -- checking and answering ---------------------------------------------------------------------------------
    def answer(self, method: str, target: str, headers: dict[str, str], raw: bytes) -> tuple[int, Any]:
        parts = urlsplit(target)
        if not parts.path.startswith(self.prefix + "/api/"):
            with self.lock:
                self.unknown.append(parts.path)
            return 404, {"message": "Not found"}
        path = parts.path[len(self.prefix):]
        auth = next((v for k, v in headers.items() if k.lower() == "authorization"), None)
        body, problems = self._body(method, headers, raw)
        with self.lock:
            self.requests.append(Seen(method, path, parse_qs(parts.query), auth, body))
            if not self._authorized(auth):  # DOCS["auth"]
                return 401, {"message": "Unauthorized"}
            if problems:
                return self._reject(method, path, problems)
            for (route_method, pattern), handler in self.routes().items():
                match = re.fullmatch(pattern, path)
                if route_method == method and match:
                    return handler(body, parse_qs(parts.query), *match.groups())
            self.unknown.append(f"{method} {path}")
            return 404, {"message": "Not found"}

    def _authorized(self, auth: str | None) -> bool:
        """DOCS["auth"]: ``Authorization: Bearer <service account token>``, or basic auth."""
        basic = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
        return auth in (f"Bearer {TOKEN}", basic)

    def _body(self, method: str, headers: dict[str, str], raw: bytes) -> tuple[Any, list[str]]:
        if method not in ("POST", "PUT", "PATCH"):
            return None, ([f"{method} with a body"] if raw else [])
        content_type = next((v for k, v in headers.items() if k.lower() == "content-type"), "")
        problems = [] if content_type.split(";")[0].strip() == "application/json" else [
            f"Content-Type {content_type!r}, the API takes application/json"]
        try:
            body = json.loads(raw)
        except ValueError:
            return None, problems + ["body is not JSON"]
        return body, problems + ([] if isinstance(body, dict) else ["body is not a JSON object"])

    def _reject(self, method: str, path: str, problems: list[str]) -> tuple[int, Any]:
        self.violations.extend(f"{method} {path}: {p}" for p in problems)
        return 400, {"message": "fake grafana: " + "; ".join(problems)}

    def _unknown_keys(self, body: dict, allowed: set[str]) -> list[str]:
        return [f"undocumented field {key!r}" for key in sorted(set(body) - allowed)]

    def routes(self):
        return {
            ("GET", r"/api/folders"): self.list_folders,
            ("GET", r"/api/folders/([^/]+)"): self.get_folder,
            ("POST", r"/api/folders"): self.create_folder,
            ("GET", r"/api/datasources/uid/([^/]+)"): self.get_datasource,
            ("POST", r"/api/dashboards/db"): self.save_dashboard,
            ("POST", r"/api/annotations"): self.create_annotation,
        }

    def list_folders(self, body, query) -> tuple[int, Any]:
        """DOCS["folder"] "Get all folders": optional query parameters limit, page, parentUid."""
        extra = sorted(set(query) - {"limit", "page", "parentUid"})
        if extra:
            return self._reject("GET", "/api/folders", [f"undocumented query parameter(s) {extra}"])
        return 200, [{"id": f["id"], "uid": f["uid"], "title": f["title"]} for f in self.folders]

    def get_folder(self, body, query, uid) -> tuple[int, Any]:
        found = next((f for f in self.folders if f["uid"] == uid), None)
        return (200, found) if found else (404, {"message": "folder not found"})

    def create_folder(self, body, query) -> tuple[int, Any]:
        """DOCS["folder"] "Create folder": title (the folder's title), optional uid (max 40 characters) and
        parentUid; 409 when the folder already exists."""
        problems = self._unknown_keys(body, {"uid", "title", "parentUid"})
        if not isinstance(body.get("title"), str) or not body["title"]:
            problems.append("title missing or not a non-empty string")
        if "uid" in body and not (isinstance(body["uid"], str) and 0 < len(body["uid"]) <= MAX_UID):
            problems.append(f"uid not a string of 1..{MAX_UID} characters")
        if "parentUid" in body and not isinstance(body["parentUid"], str):
            problems.append("parentUid not a string")
        if problems:
            return self._reject("POST", "/api/folders", problems)
        if any(f["title"] == body["title"] or f["uid"] == body.get("uid") for f in self.folders):
            return 409, {"message": "a folder with the same name or uid already exists"}
        folder = {"id": next(self.ids), "uid": body.get("uid") or f"f{len(self.folders)}", "title": body["title"],
                  "url": f"{self.prefix}/dashboards/f/{body.get('uid')}/", "version": 1}
        self.folders.append(folder)
        return 200, folder

    def get_datasource(self, body, query, uid) -> tuple[int, Any]:
        """DOCS["datasource"] "Get a single data source by uid"."""
        if uid not in self.datasources:
            return 404, {"message": "Data source not found"}
        return 200, {"id": 1, "uid": uid, "orgId": 1, "name": uid, "type": self.datasources[uid],
                     "access": "proxy", "url": "http://prometheus:9090", "isDefault": True, "jsonData": {}}

    def save_dashboard(self, body, query) -> tuple[int, Any]:
        """DOCS["dashboard"] "Create / Update dashboard": dashboard (the complete model; id null to create, uid
        optional, max 40 characters), folderId, folderUid, overwrite, message; 412 ``name-exists`` when a dashboard
        with the uid exists and overwrite is not true."""
        problems = self._unknown_keys(body, {"dashboard", "folderId", "folderUid", "overwrite", "message"})
        dashboard = body.get("dashboard")
        if not isinstance(dashboard, dict):
            problems.append("dashboard missing or not an object")
            dashboard = {}
        if not _int_or_null(dashboard.get("id")):
            problems.append("dashboard.id not null or an integer")
        uid = dashboard.get("uid")
        if not (uid is None or isinstance(uid, str) and 0 < len(uid) <= MAX_UID):
            problems.append(f"dashboard.uid not null or a string of 1..{MAX_UID} characters")
        if not isinstance(dashboard.get("title"), str) or not dashboard.get("title"):
            problems.append("dashboard.title missing (a dashboard model has a title)")
        for key, ok in (("folderId", _is_int), ("folderUid", lambda v: isinstance(v, str)),
                        ("overwrite", lambda v: isinstance(v, bool)), ("message", lambda v: isinstance(v, str))):
            if key in body and not ok(body[key]):
                problems.append(f"{key} of the wrong type")
        if problems:
            return self._reject("POST", "/api/dashboards/db", problems)
        if body.get("folderUid") and not any(f["uid"] == body["folderUid"] for f in self.folders):
            return 400, {"message": "folder not found"}
        uid = uid or f"d{len(self.dashboards)}"
        if uid in self.dashboards and body.get("overwrite") is not True:
            return 412, {"message": "A dashboard with the same uid already exists", "status": "name-exists"}
        version = self.dashboards.get(uid, {}).get("version", 0) + 1
        slug = re.sub(r"[^a-z0-9]+", "-", dashboard["title"].lower()).strip("-")
        self.dashboards[uid] = {"request": body, "version": version}
        return 200, {"id": next(self.ids), "uid": uid, "url": f"{self.prefix}/d/{uid}/{slug}", "status": "success",
                     "version": version, "slug": slug}

    def create_annotation(self, body, query) -> tuple[int, Any]:
        """DOCS["annotation"] "Create Annotation": text required; dashboardUID, dashboardId, panelId optional;
        time and timeEnd "epoch numbers in millisecond resolution"; tags a list of strings."""
        if self.outage > 0:
            self.outage -= 1
            return 503, {"message": "fake outage"}
        problems = self._unknown_keys(body, {"dashboardUID", "dashboardId", "panelId", "time", "timeEnd", "tags",
                                             "text"})
        if not isinstance(body.get("text"), str) or not body.get("text"):
            problems.append("text (required) missing or not a non-empty string")
        for key in ("time", "timeEnd"):
            if key in body and not _int_or_null(body[key]):
                problems.append(f"{key} not an integer (epoch ms)")
            elif body.get(key) is not None and body[key] < EPOCH_MS_2001:
                problems.append(f"{key}={body[key]} is not epoch milliseconds")
        if body.get("timeEnd") is not None and _is_int(body.get("time")) and body["timeEnd"] < body["time"]:
            problems.append("timeEnd before time")
        if "tags" in body and not (isinstance(body["tags"], list) and all(isinstance(t, str) for t in body["tags"])):
            problems.append("tags not a list of strings")
        for key in ("dashboardId", "panelId"):
            if key in body and not _int_or_null(body[key]):
                problems.append(f"{key} not an integer")
        if "dashboardUID" in body and not _str_or_null(body["dashboardUID"]):
            problems.append("dashboardUID not a string")
        if problems:
            return self._reject("POST", "/api/annotations", problems)
        ident = next(self.ids)
        self.annotations.append({"id": ident, **body})
        return 200, {"message": "Annotation added", "id": ident}


@pytest.fixture
def fake():
    server = FakeGrafana(datasources={"fedguard-prometheus": "prometheus", "prom-main": "prometheus",
                                      "loki-main": "loki"})
    yield server
    server.close()


def repository_dashboards() -> list[tuple[str, str]]:
    """(title, uid) of every dashboard in monitoring/grafana/dashboards, in push order (by file name)."""
    return [(d["title"], d["uid"]) for d in grafana.load_dashboards()]


def datasource_uids(obj: Any) -> set[str]:
    if isinstance(obj, dict):
        ref = obj.get("datasource")
        own = {ref["uid"]} if isinstance(ref, dict) and ref.get("type") == "prometheus" else set()
        return own.union(*(datasource_uids(v) for v in obj.values()))
    if isinstance(obj, list):
        return set().union(*(datasource_uids(v) for v in obj)) if obj else set()
    return set()


def assert_one_line(error: grafana.GrafanaError, *needles: str) -> None:
    text = str(error)
    assert "\n" not in text and len(text) <= 400, text
    for needle in needles:
        assert needle in text, text


# -- push ---------------------------------------------------------------------------------------------------------
def test_push_creates_the_folder_and_posts_each_dashboard_with_overwrite_and_the_datasource_mapped(fake):
    client = grafana.connect(fake.url, token=TOKEN)
    pushed = grafana.push_dashboards(client, folder="fedguard", datasource_uid="prom-main")

    assert fake.violations == [] and fake.unknown == []
    assert [r.auth for r in fake.requests] == [f"Bearer {TOKEN}"] * len(fake.requests)
    assert len(fake.seen("GET", "/api/datasources/uid/prom-main")) == 1
    [created] = fake.seen("POST", "/api/folders")
    assert created.body["title"] == "fedguard"
    folder_uid = fake.folders[0]["uid"]
    posts = fake.seen("POST", "/api/dashboards/db")
    assert [(p.body["dashboard"]["title"], p.body["dashboard"]["uid"]) for p in posts] == repository_dashboards()
    for post in posts:
        assert post.body["overwrite"] is True and post.body["folderUid"] == folder_uid
        assert post.body["dashboard"]["id"] is None
        assert datasource_uids(post.body["dashboard"]) == {"prom-main"}  # every panel and target, none left behind
    for dashboard in grafana.load_dashboards():  # the files are untouched
        assert datasource_uids(dashboard) == {grafana.PROVISIONED_DATASOURCE_UID}
    assert [(t, u) for t, u, _ in pushed] == repository_dashboards()
    title, uid = repository_dashboards()[0]
    slug = re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")
    assert pushed[0][2] == f"{fake.origin}/d/{uid}/{slug}"

    # A second push finds the folder (no second POST /api/folders) and overwrites the dashboards.
    grafana.push_dashboards(client, folder="fedguard", datasource_uid="prom-main")
    assert len(fake.seen("POST", "/api/folders")) == 1 and len(fake.folders) == 1
    assert {u: fake.dashboards[u]["version"] for _, u in repository_dashboards()} == {
        u: 2 for _, u in repository_dashboards()}
    assert fake.violations == []


def test_push_uses_an_existing_folder_and_the_provisioned_datasource_uid_by_default(tmp_path):
    fake = FakeGrafana(folders=[{"id": 7, "uid": "ops-folder", "title": "Ops"}])
    try:
        second = {"title": "extra", "uid": "extra-1", "panels": []}
        (tmp_path / "a.json").write_text(json.dumps(grafana.load_dashboards()[0]))
        (tmp_path / "b.json").write_text(json.dumps(second))
        pushed = grafana.push_dashboards(grafana.connect(fake.url, user=USER, password=PASSWORD), tmp_path,
                                         folder="Ops")
        assert fake.violations == [] and fake.seen("POST", "/api/folders") == []
        posts = fake.seen("POST", "/api/dashboards/db")
        assert [p.body["folderUid"] for p in posts] == ["ops-folder", "ops-folder"]
        assert datasource_uids(posts[0].body["dashboard"]) == {grafana.PROVISIONED_DATASOURCE_UID}
        assert all(p.auth.startswith("Basic ") for p in fake.requests)
        assert [u for _, u, _ in pushed] == [repository_dashboards()[0][1], "extra-1"]
    finally:
        fake.close()


def test_push_fails_in_one_line_with_a_hint_when_the_target_lacks_the_datasource(fake):
    client = grafana.connect(fake.url, token=TOKEN)
    with pytest.raises(grafana.GrafanaError) as missing:
        grafana.push_dashboards(client, datasource_uid="no-such-uid")
    assert_one_line(missing.value, "no-such-uid", "--datasource-uid")
    with pytest.raises(grafana.GrafanaError) as wrong_type:
        grafana.push_dashboards(client, datasource_uid="loki-main")
    assert_one_line(wrong_type.value, "loki", "Prometheus", "--datasource-uid")
    assert fake.seen("POST", "/api/dashboards/db") == [] and fake.seen("POST", "/api/folders") == []


def test_push_of_an_empty_directory_is_a_one_line_error(fake, tmp_path):
    with pytest.raises(grafana.GrafanaError) as empty:
        grafana.push_dashboards(grafana.connect(fake.url, token=TOKEN), tmp_path)
    assert_one_line(empty.value, str(tmp_path), "monitoring/grafana/dashboards")
    assert fake.requests == []


def test_map_datasource_changes_only_references_to_the_provisioned_uid():
    dashboard = {"panels": [{"datasource": {"type": "prometheus", "uid": "fedguard-prometheus"},
                             "targets": [{"datasource": {"type": "prometheus", "uid": "fedguard-prometheus"}}]}],
                 "annotations": {"list": [{"datasource": {"type": "grafana", "uid": "-- Grafana --"}}]}}
    mapped = grafana.map_datasource(dashboard, "fedguard-prometheus", "other")
    assert mapped["panels"][0]["datasource"]["uid"] == "other"
    assert mapped["panels"][0]["targets"][0]["datasource"] == {"type": "prometheus", "uid": "other"}
    assert mapped["annotations"]["list"][0]["datasource"]["uid"] == "-- Grafana --"
    assert dashboard["panels"][0]["datasource"]["uid"] == "fedguard-prometheus"  # a copy


def test_folder_uid_is_valid_for_grafana():
    assert grafana.folder_uid_for("fedguard") == "fedguard"
    assert grafana.folder_uid_for("  FL / Défense lab ") == "fl---d-fense-lab"
    assert len(grafana.folder_uid_for("x" * 100)) == MAX_UID


# -- annotations --------------------------------------------------------------------------------------------------
def test_annotate_posts_the_documented_body_in_epoch_milliseconds(fake):
    client = grafana.connect(fake.url, token=TOKEN)
    first = grafana.annotate(client, "device dev-0001 quarantined", ["fedguard", "quarantine"], at=1_700_000_000.25)
    second = grafana.annotate(client, "attack", ("fedguard", "attack"), at=1_700_000_100.0, end=1_700_000_160.0,
                              dashboard_uid="fedguard-pipeline")
    assert fake.violations == []
    assert [a["id"] for a in fake.annotations] == [first, second] and first != second
    assert fake.annotations[0]["time"] == 1_700_000_000_250 and fake.annotations[0]["timeEnd"] is None
    assert fake.annotations[0]["tags"] == ["fedguard", "quarantine"]
    assert "dashboardUID" not in fake.annotations[0]  # an organization annotation
    assert fake.annotations[1]["timeEnd"] == 1_700_000_160_000
    assert fake.annotations[1]["dashboardUID"] == "fedguard-pipeline"


def test_grafana_under_a_sub_path_is_reached_with_or_without_the_trailing_slash():
    fake = FakeGrafana(prefix="/grafana")
    try:
        for url in (fake.url, fake.url + "/"):
            grafana.annotate(grafana.connect(url, token=TOKEN), "x", ["fedguard"])
        assert fake.unknown == [] and fake.violations == [] and len(fake.annotations) == 2
    finally:
        fake.close()


# -- errors -------------------------------------------------------------------------------------------------------
def test_a_bad_token_is_a_one_line_error_with_a_hint(fake):
    client = grafana.connect(fake.url, token="not-the-token")
    with pytest.raises(grafana.GrafanaError) as bad:
        grafana.push_dashboards(client)
    assert_one_line(bad.value, "401", "GRAFANA_TOKEN")
    assert bad.value.status == 401
    with pytest.raises(grafana.GrafanaError) as bad_annotation:
        grafana.annotate(client, "x", ["fedguard"])
    assert_one_line(bad_annotation.value, "401", "GRAFANA_TOKEN")
    assert fake.annotations == []


def test_an_unreachable_grafana_is_a_one_line_error_with_a_hint():
    url = f"http://user:hunter2@127.0.0.1:{free_port()}"  # nothing listens there
    with pytest.raises(grafana.GrafanaError) as down:
        grafana.annotate(grafana.connect(url, timeout_s=5), "x", ["fedguard"])
    assert_one_line(down.value, "unreachable", "GRAFANA_URL")
    assert "hunter2" not in str(down.value)
    assert down.value.status == 0 and down.value.retryable


def test_a_wrong_path_is_a_one_line_404_with_a_hint(fake):
    with pytest.raises(grafana.GrafanaError) as wrong:
        grafana.annotate(grafana.connect(fake.origin + "/not-grafana", token=TOKEN), "x", ["fedguard"])
    assert_one_line(wrong.value, "404", "sub-path")
    assert fake.unknown == ["/not-grafana/api/annotations"]


def test_each_failure_becomes_one_line_with_a_hint_and_says_whether_to_retry():
    """The answers the fake does not give (403, 5xx, timeouts, a provisioned dashboard), classified directly."""
    url = "http://grafana:3000"
    cases = [
        (GrafanaBadInputError({"message": "Cannot save provisioned dashboard"}), "save dashboard 'x'",
         ("provisions this dashboard", "another Grafana"), False),
        (GrafanaClientError(403, {"message": "Permission denied"}, "Client Error 403"), "create folder 'fedguard'",
         ("403", "Permission denied", "Editor"), True),
        (GrafanaServerError(503, {"message": "database is locked"}, "Server Error 503"), "create annotation",
         ("503", "database is locked", "server log"), True),
        (requests.ReadTimeout("HTTPConnectionPool(...): Read timed out. (read timeout=10)"),
         "create annotation", ("unreachable", "timed out", "GRAFANA_URL"), True),
        (GrafanaClientError(422, {"message": "bad"}, "Client Error 422"), "create annotation", ("422", "bad"), False),
    ]
    for error, action, needles, retryable in cases:
        described = grafana.describe(error, action, url)
        assert_one_line(described, *needles)
        assert described.retryable is retryable, described


def test_connect_reads_the_environment_and_says_what_is_missing(fake):
    with pytest.raises(grafana.GrafanaError) as no_url:
        grafana.connect(env={})
    assert_one_line(no_url.value, "GRAFANA_URL")
    assert no_url.value.status is None and not no_url.value.retryable  # a setting, not Grafana: no retry
    with pytest.raises(grafana.GrafanaError) as no_credential:
        grafana.connect(env={"GRAFANA_URL": fake.url})
    assert_one_line(no_credential.value, "GRAFANA_TOKEN", "GRAFANA_USER")
    with pytest.raises(grafana.GrafanaError) as half:
        grafana.connect(env={"GRAFANA_URL": fake.url, "GRAFANA_USER": USER})
    assert_one_line(half.value, "GRAFANA_PASSWORD")
    with pytest.raises(grafana.GrafanaError) as not_http:
        grafana.connect(env={"GRAFANA_URL": "localhost:3000", "GRAFANA_TOKEN": TOKEN})
    assert_one_line(not_http.value, "http://")

    grafana.annotate(grafana.connect(env={"GRAFANA_URL": fake.url, "GRAFANA_TOKEN": TOKEN}), "a", ["fedguard"])
    grafana.annotate(grafana.connect(env={"GRAFANA_URL": fake.url, "GRAFANA_USER": USER,
                                          "GRAFANA_PASSWORD": PASSWORD}), "b", ["fedguard"])
    in_url = fake.url.replace("http://", f"http://{USER}:{PASSWORD}@")
    grafana.annotate(grafana.connect(env={"GRAFANA_URL": in_url}), "c", ["fedguard"])
    assert fake.violations == [] and [a["text"] for a in fake.annotations] == ["a", "b", "c"]
    assert [r.auth.split()[0] for r in fake.requests] == ["Bearer", "Basic", "Basic"]


def test_the_fake_rejects_what_the_docs_reject(fake):
    """The checks can fail: requests that break the documented API are refused and recorded."""
    client = grafana.connect(fake.url, token=TOKEN)
    with pytest.raises(GrafanaClientError) as seconds:  # time in seconds, not epoch ms
        client.annotations.add_annotation(time_from=1_700_000_000, tags=["x"], text="t")
    assert seconds.value.status_code == 400
    assert fake.violations == ["POST /api/annotations: time=1700000000 is not epoch milliseconds"]
    fake.violations.clear()
    with pytest.raises(GrafanaClientError):
        client.annotations.add_annotation(time_from=1_700_000_000_000, tags=["x"])  # no text
    assert fake.violations == ["POST /api/annotations: text (required) missing or not a non-empty string"]
    fake.violations.clear()
    with pytest.raises(GrafanaClientError):
        client.dashboard.update_dashboard({"dashboard": {"title": "t"}, "folderUID": "typo"})
    assert fake.violations == ["POST /api/dashboards/db: undocumented field 'folderUID'"]
    fake.violations.clear()
    client.dashboard.update_dashboard({"dashboard": {"uid": "u1", "title": "t"}})
    with pytest.raises(GrafanaClientError) as exists:  # same uid without overwrite: 412 name-exists
        client.dashboard.update_dashboard({"dashboard": {"uid": "u1", "title": "t"}})
    assert exists.value.status_code == 412 and fake.violations == []
    assert fake.requests[0].auth == f"Bearer {TOKEN}"


# -- the annotator's decisions (pure) -----------------------------------------------------------------------------
def test_quarantine_and_release_events_become_annotations_and_others_do_not():
    quarantined = {"type": "quarantined", "device_id": "dev-0003", "window_id": "m:7", "trust": 0.1234, "at": 100.0,
                   "verdict": "reject", "flags": [], "reasons": [], "update_id": "u"}
    [a] = annotations_for_event(quarantined)
    assert a == Annotation("device dev-0003 quarantined: trust 0.123 after window m:7",
                           ("fedguard", "quarantine", "quarantined"), 100.0)
    [r] = annotations_for_event({"type": "released", "device_id": "dev-0003", "trust": 0.5, "at": 200.0,
                                 "reason": "probation over"})
    assert r == Annotation("device dev-0003 released: probation over, trust 0.500",
                           ("fedguard", "quarantine", "released"), 200.0)
    for other in ({"type": "flagged", "device_id": "d", "at": 1.0}, {"type": "rate_limited", "device_id": "d"},
                  {"type": "replay"}, {}, {"type": None}):
        assert annotations_for_event(other) == []
    [no_time] = annotations_for_event({"type": "quarantined", "device_id": "d", "at": "soon"}, now=42.0)
    assert no_time.at == 42.0 and no_time.text == "device d quarantined"


def version(n: int, rule: str, params: dict | None = None, at: float = 10.0) -> dict:
    return {"model_id": "m", "version": n, "parent": n - 1 if n else None, "rule": rule, "rule_params": params or {},
            "created_at": at + n}


def test_rule_change_compares_with_the_previous_version():
    assert rule_change(None, version(0, "fedavg")) is None  # first version seen: no baseline
    assert rule_change(version(0, "fedavg"), version(1, "fedavg")) is None
    change = rule_change(version(1, "fedavg"), version(2, "krum", {"f": 2}))
    assert change == Annotation('aggregation rule changed: fedavg -> krum {"f": 2} (version 2)', ("fedguard", "rule"),
                                12.0)
    assert rule_change(version(2, "krum", {"f": 2}), version(3, "krum", {"f": 3})) is not None  # parameters count
    assert rule_change(version(3, "krum"), version(3, "median")) is None  # same version re-delivered
    assert rule_change(version(3, "krum"), version(2, "median")) is None  # older


def campaign(ident: str = "c1", kind: str = "sign_flip", started: float = 10.0, stopped: float | None = None):
    return Campaign(kind=kind, params={}, fraction=0.5, devices=["dev-0000", "dev-0001", "dev-0002"],
                    start_version=0, rounds=None, id=ident, started_at=started, stopped_at=stopped)


def test_campaign_change_marks_starts_stops_and_replacements():
    running, stopped = campaign(), campaign(stopped=20.0)
    [started] = campaign_change(None, running)
    assert started == Annotation("attack started: sign_flip on 3 devices (campaign c1)",
                                 ("fedguard", "attack", "sign_flip", "started"), 10.0)
    assert campaign_change(running, running) == []
    [ended] = campaign_change(running, stopped)
    assert ended == Annotation("attack stopped: sign_flip (campaign c1)",
                               ("fedguard", "attack", "sign_flip", "stopped"), 20.0)
    assert campaign_change(stopped, stopped) == [] and campaign_change(running, None) == []
    assert [a.tags[-1] for a in campaign_change(None, stopped)] == ["started", "stopped"]  # both between two polls
    replaced = campaign_change(running, campaign("c2", "alie", started=30.0))
    assert [(a.text, a.at) for a in replaced] == [
        ("attack stopped: sign_flip (campaign c1, replaced by alie)", 30.0),
        ("attack started: alie on 3 devices (campaign c2)", 30.0)]
    assert [a.tags[-1] for a in campaign_change(stopped, campaign("c2", started=30.0))] == ["started"]


def test_only_what_happened_since_the_start_is_annotated_and_an_event_once():
    old, new = Annotation("old", ("fedguard",), 99.9), Annotation("new", ("fedguard",), 100.0)
    assert since_start([old, new], 100.0) == [new]
    reader = _Reader(since=100.0)
    event = {"type": "quarantined", "device_id": "d", "at": 150.0}
    assert len(reader.on_event(event)) == 1 and reader.on_event(dict(event)) == []  # re-delivered
    assert reader.on_event({"type": "quarantined", "device_id": "d", "at": 50.0}) == []  # before the start
    assert reader.on_version(version(0, "fedavg", at=0.0)) == []  # old: only the baseline
    assert reader.on_version(version(1, "krum", at=0.0)) == []  # changed before the start
    assert [a.text for a in reader.on_version(version(2, "median", at=200.0))] == [
        "aggregation rule changed: krum -> median (version 2)"]
    assert reader.on_campaign(campaign(started=50.0)) == []  # running since before the start
    assert [a.tags[-1] for a in reader.on_campaign(campaign(started=50.0, stopped=150.0))] == ["stopped"]


def test_backoff_grows_to_a_bound():
    assert [backoff(n) for n in (1, 2, 3, 4, 5, 6, 7, 20)] == [1, 2, 4, 8, 16, 30, 30, 30]


def test_outbox_keeps_annotations_through_an_outage_and_sends_them_in_order_once(fake):
    outbox = Outbox(grafana.connect(fake.url, token=TOKEN))
    fake.outage = 2
    outbox.add([Annotation("one", ("fedguard",), 1_700_000_000.0), Annotation("two", ("fedguard",), 1_700_000_001.0)])
    outbox.flush(now=0.0)  # 503: kept, retry in 1 s
    assert len(outbox.pending) == 2 and outbox.retry_at == 1.0 and fake.annotations == []
    outbox.flush(now=0.5)  # not yet: no request
    assert len(fake.seen("POST", "/api/annotations")) == 1
    outbox.flush(now=1.0)  # 503 again: retry in 2 s
    assert outbox.retry_at == 3.0 and len(fake.seen("POST", "/api/annotations")) == 2
    outbox.flush(now=3.0)
    assert [a["text"] for a in fake.annotations] == ["one", "two"] and not outbox.pending and outbox.sent == 2
    assert outbox.failures == 0 and fake.violations == []


def test_outbox_drops_an_annotation_grafana_rejects_and_goes_on(fake):
    outbox = Outbox(grafana.connect(fake.url, token=TOKEN))
    outbox.add([Annotation("bad time", ("fedguard",), 1.0), Annotation("good", ("fedguard",), 1_700_000_000.0)])
    outbox.flush(now=0.0)
    assert [a["text"] for a in fake.annotations] == ["good"] and outbox.dropped == 1 and not outbox.pending
    assert len(fake.violations) == 1  # the fake refused "bad time": epoch 1 s is not an epoch in ms


def test_the_push_command_uploads_every_dashboard_and_fails_in_one_line(fake, capsys, monkeypatch):
    from fedguard.cli import main

    monkeypatch.setenv("GRAFANA_TOKEN", TOKEN)
    monkeypatch.delenv("GRAFANA_URL", raising=False)
    assert main(["grafana", "push", "--url", fake.url, "--datasource-uid", "prom-main"]) == 0
    out = capsys.readouterr().out
    assert f"{len(repository_dashboards())} dashboards pushed to folder 'fedguard'" in out
    assert len(fake.seen("POST", "/api/dashboards/db")) == len(repository_dashboards())
    assert fake.violations == []

    monkeypatch.setenv("GRAFANA_TOKEN", "wrong")
    assert main(["grafana", "push", "--url", fake.url, "--datasource-uid", "prom-main"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("fedguard: ") and "\n" not in err and "401" in err
