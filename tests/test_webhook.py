"""Hub webhooks -> `lssf.finetune.discovered`: the lineage rule, the event, the receiver.

Payloads are hand-written in the Hub's format as documented at
https://huggingface.co/docs/hub/webhooks (huggingface/hub-docs docs/hub/webhooks.md: `event`
{action, scope}, `repo` {type, name, id, private, url, headSha, owner}, `updatedRefs`
[{ref, oldSha, newSha}], `webhook` {id, version}); ids and shas are made up.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from huggingface_hub import ModelInfo

from tasks.events import DISCOVERED_EVENT, discovered_event, event_id
from tasks.lineage import lineage_of
from tasks.sources import Candidate
from tests.prefect_server import flow_runs, free_port

ROOT = Path(__file__).resolve().parents[1]
BASE = "Qwen/Qwen2.5-0.5B-Instruct"
BOTH = ("finetune", "adapter")


# -- the lineage rule -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tags", "lineages", "expected"),
    [
        ([f"base_model:finetune:{BASE}", f"base_model:{BASE}"], BOTH, "finetune"),
        ([f"base_model:adapter:{BASE}"], BOTH, "adapter"),
        ([f"base_model:adapter:{BASE}"], ("finetune",), None),  # lineage not watched
        ([f"base_model:merge:{BASE}", f"base_model:quantized:{BASE}"], BOTH, None),
        ([f"base_model:finetune:{BASE}-extra"], BOTH, None),  # another repo, same prefix
        ([f"base_model:finetune:{BASE.lower()}"], BOTH, "finetune"),  # Hub ids ignore case
        ([f"base_model:{BASE}", "license:apache-2.0"], BOTH, None),  # no relation declared
        ([f"base_model:finetune:{BASE}", f"base_model:adapter:{BASE}"], ("adapter",), "adapter"),
        (None, BOTH, None),
    ],
)
def test_lineage_from_hub_tags(tags, lineages, expected) -> None:
    info = ModelInfo(id="someone/ft", sha="a" * 40, tags=tags)
    assert lineage_of(info, BASE, lineages) == expected
    assert lineage_of(info, f"{BASE}@0123abc", lineages) == expected  # revision ignored


@pytest.mark.parametrize(
    ("card", "expected"),
    [
        ({"base_model": BASE, "base_model_relation": "adapter"}, "adapter"),
        ({"base_model": [f"{BASE}", "other/model"], "base_model_relation": "finetune"}, "finetune"),
        ({"base_model": BASE}, None),  # relation left to the Hub's inference (its tags)
        ({"base_model": "other/model", "base_model_relation": "finetune"}, None),
        ({"base_model": BASE, "base_model_relation": "quantized"}, None),
        ({"license": "mit"}, None),
    ],
)
def test_lineage_from_card_data(card, expected) -> None:
    info = ModelInfo(id="someone/ft", sha="a" * 40, cardData=card)
    assert lineage_of(info, BASE, BOTH) == expected


def test_the_base_model_itself_is_no_descendant() -> None:
    info = ModelInfo(id=BASE, sha="a" * 40, tags=[f"base_model:finetune:{BASE}"])
    assert lineage_of(info, BASE, BOTH) is None


@pytest.mark.parametrize(
    ("ref", "expected"),
    [
        ("Qwen/Qwen2.5-0.5B@" + "a" * 40, "Qwen/Qwen2.5-0.5B"),
        (" org/name@main ", "org/name"),
        ("org/name", "org/name"),
        ("/no/such/folder", "/no/such/folder"),  # no Hub id: compared as is, matches nothing
    ],
)
def test_bare_id_drops_the_revision_through_modelref(ref, expected) -> None:
    from tasks.lineage import bare_id

    assert bare_id(ref) == expected


# -- the event ------------------------------------------------------------------------------


def _realign_trigger() -> dict:
    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    (trigger,) = {d["name"]: d for d in spec["deployments"]}["realign"]["triggers"]
    return trigger


def test_event_fills_every_trigger_parameter_and_matches_it() -> None:
    cand = Candidate(repo="someone/ft", revision="b" * 40, lineage="finetune")
    kwargs = discovered_event(cand, "qwen", "configs/q.yaml")
    trigger = _realign_trigger()
    used = {
        re.search(r"event\.payload\.(\w+)", v).group(1)  # type: ignore[union-attr]
        for v in trigger["parameters"].values()
    }
    assert set(kwargs["payload"]) == used
    assert kwargs["event"] == DISCOVERED_EVENT and trigger["expect"] == [DISCOVERED_EVENT]
    resource_id = kwargs["resource"]["prefect.resource.id"]
    assert resource_id == f"lssf.finetune.someone/ft@{'b' * 40}"
    assert re.fullmatch(trigger["match"]["prefect.resource.id"].replace("*", ".*"), resource_id)
    assert kwargs["payload"] == {
        "finetuned": f"someone/ft@{'b' * 40}",
        "revision": "b" * 40,
        "family": "qwen",
        "config": "configs/q.yaml",
    }


def test_event_id_is_deterministic_per_commit_and_family() -> None:
    a = Candidate(repo="someone/ft", revision="b" * 40)
    b = Candidate(repo="someone/ft", revision="c" * 40)
    assert discovered_event(a, "f", "x.yaml")["id"] == discovered_event(a, "f", "y.yaml")["id"]
    assert event_id(a.key, "f") == discovered_event(a, "f", "x.yaml")["id"]
    assert len({event_id(a.key, "f"), event_id(a.key, "g"), event_id(b.key, "f")}) == 3


# -- the receiver, over real HTTP -----------------------------------------------------------

SECRET = "s3cret-shared-with-the-hub"
FT, ADAPTER, OTHER = "someone/qwen-ft", "someone/qwen-lora", "someone/llama-ft"
SHA, SHA2 = "575db8b7a51b6f85eb06eee540738584589f131c", "ce9a4674fa833a68d5a73ec355f0ea95eedd60b7"


def hub_payload(
    name: str = FT,
    sha: str | None = SHA,
    *,
    repo_type: str = "model",
    scope: str = "repo.content",
    action: str = "update",
    ref: str = "refs/heads/main",
) -> dict:
    """A `repo.content` delivery as the Hub sends it on a push (docs/hub/webhooks.md)."""
    return {
        "event": {"action": action, "scope": scope},
        "repo": {
            "type": repo_type,
            "name": name,
            "id": "6366c000a2abcdf2fd69a080",
            "private": False,
            "url": {
                "web": f"https://huggingface.co/{name}",
                "api": f"https://huggingface.co/api/models/{name}",
            },
            "headSha": sha,
            "tags": ["license:apache-2.0", "has_space"],
            "owner": {"id": "61d2000c3c2083e1c08af22d"},
        },
        "updatedRefs": [
            {"ref": ref, "oldSha": "ce9a4674fa833a68d5a73ec355f0ea95eedd60b7", "newSha": sha},
            {"ref": "refs/tags/v1", "oldSha": None, "newSha": SHA},
        ],
        "webhook": {"id": "6390e855e30d9209411de93b", "version": 3},
    }


def _hub_models() -> dict[tuple[str, str], ModelInfo]:
    """What `HfApi().model_info(repo, revision=sha)` would answer, as the Hub spells it."""
    return {
        (FT, SHA): ModelInfo(
            id=FT, sha=SHA, tags=[f"base_model:finetune:{BASE}", f"base_model:{BASE}"]
        ),
        (FT, SHA2): ModelInfo(id=FT, sha=SHA2, tags=[f"base_model:finetune:{BASE}"]),
        (ADAPTER, SHA): ModelInfo(
            id=ADAPTER,
            sha=SHA,
            cardData={"base_model": BASE, "base_model_relation": "adapter"},
            tags=["peft"],
        ),
        (OTHER, SHA): ModelInfo(id=OTHER, sha=SHA, tags=["base_model:finetune:meta/llama"]),
        (BASE, SHA): ModelInfo(id=BASE, sha=SHA, tags=[f"base_model:finetune:{BASE}"]),
    }


def fake_model_info(repo: str, revision: str) -> ModelInfo:
    """A fake `model_info`: the models above, a 404 for anything else (no network)."""
    import httpx2
    from huggingface_hub.errors import RepositoryNotFoundError

    try:
        return _hub_models()[(repo, revision)]
    except KeyError:
        url = f"https://huggingface.co/api/models/{repo}/revision/{revision}"
        response = httpx2.Response(404, request=httpx2.Request("GET", url))
        raise RepositoryNotFoundError(f"404: {repo}", response=response) from None


def _pipeline(tmp_path: Path, base: str = BASE) -> Path:
    """Two families watching the Hub (one of them fine-tunes only) and one local folder."""
    families = {
        "qwen": {
            "aligned": f"{base}@0123abc",
            "reference": "Qwen/Qwen2.5-0.5B",
            "watch": {"kind": "hub"},
            "registered_model": "qwen-realigned",
        },
        "qwen-ft-only": {
            "aligned": str(tmp_path / "aligned"),
            "reference": str(tmp_path / "base"),
            "watch": {"kind": "hub", "base_model": base, "lineages": ["finetune"]},
            "registered_model": "qwen-ft-realigned",
        },
        "organism": {
            "aligned": base,  # a Hub id, but this family watches a folder: not served
            "reference": str(tmp_path / "base"),
            "watch": {"kind": "local", "path": str(tmp_path / "watch")},
            "registered_model": "organism-realigned",
        },
    }
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump({"state_dir": str(tmp_path / "state"), "families": families}))
    return path


class Recorder:
    """An emitter that records what would be sent and returns the real event id."""

    def __init__(self, fail: int = 0) -> None:
        self.sent: list[tuple[str, str, str]] = []
        self.fail = fail

    async def __call__(self, candidate: Candidate, family: str, config: str) -> str:
        if self.fail:
            self.fail -= 1
            raise ConnectionError("Prefect server unreachable")
        self.sent.append((candidate.key, family, config))
        return str(discovered_event(candidate, family, config)["id"])


class LiveServer:
    """uvicorn serving `app` in a thread on a free port: real sockets, real HTTP."""

    def __init__(self, app, context=None) -> None:
        import contextvars
        import threading

        import uvicorn

        self.port = free_port()
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        # A thread starts with an empty context: hand it the caller's (Prefect's settings).
        context = context or contextvars.copy_context()
        self.thread = threading.Thread(target=context.run, args=(self.server.run,), daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> LiveServer:
        import time

        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def _receiver(tmp_path: Path, emit, state: Path | None = None, **kw):
    from flows.webhook import Receiver, SeenStore
    from tasks.config import load_config

    config = _pipeline(tmp_path)
    return Receiver(
        config=load_config(config),
        config_ref=str(config),
        secret=SECRET,
        seen=SeenStore((state or tmp_path / "state" / "webhook") / "seen.sqlite"),
        model_info=kw.pop("model_info", fake_model_info),
        emit=emit,
        **kw,
    )


@pytest.fixture
def live(tmp_path: Path):
    """(base URL, recorder, receiver) of a receiver served over real HTTP."""
    from flows.webhook import create_app

    recorder = Recorder()
    receiver = _receiver(tmp_path, recorder)
    with LiveServer(create_app(receiver)) as server:
        yield server.url, recorder, receiver


def _post(url: str, body, secret: str | None = SECRET, **headers: str):
    import httpx

    if secret is not None:
        headers["X-Webhook-Secret"] = secret
    if isinstance(body, (dict, list)):
        return httpx.post(f"{url}/webhook", json=body, headers=headers, timeout=30)
    return httpx.post(f"{url}/webhook", content=body, headers=headers, timeout=30)


def test_a_fine_tune_pushed_to_main_is_announced_to_every_family_watching_it(live) -> None:
    url, recorder, _ = live
    response = _post(url, hub_payload(FT))
    assert response.status_code == 202, response.text
    emitted = response.json()["emitted"]
    assert {(e["family"], e["lineage"]) for e in emitted} == {
        ("qwen", "finetune"),
        ("qwen-ft-only", "finetune"),
    }
    config = recorder.sent[0][2]
    assert sorted(recorder.sent) == [
        (f"{FT}@{SHA}", "qwen", config),
        (f"{FT}@{SHA}", "qwen-ft-only", config),
    ]
    expected = {str(event_id(f"{FT}@{SHA}", e["family"])) for e in emitted}
    assert {e["event_id"] for e in emitted} == expected


def test_an_adapter_goes_only_to_the_family_that_watches_adapters(live) -> None:
    url, recorder, _ = live
    response = _post(url, hub_payload(ADAPTER))
    assert response.status_code == 202, response.text
    assert [(e["family"], e["lineage"]) for e in response.json()["emitted"]] == [
        ("qwen", "adapter")
    ]
    assert [s[:2] for s in recorder.sent] == [(f"{ADAPTER}@{SHA}", "qwen")]


@pytest.mark.parametrize(
    ("secret", "reason"),
    [
        (None, "missing X-Webhook-Secret"),
        ("wrong", "wrong X-Webhook-Secret"),
        (SECRET[:-1], "wrong"),
    ],
)
def test_a_missing_or_wrong_secret_is_401_and_nothing_happens(live, secret, reason) -> None:
    url, recorder, _ = live
    response = _post(url, hub_payload(FT), secret=secret)
    assert response.status_code == 401
    assert reason in response.json()["error"]
    assert SECRET not in response.text
    assert recorder.sent == []


def test_an_oversized_body_is_413_even_without_content_length(live) -> None:
    url, recorder, _ = live
    big = hub_payload(FT) | {"padding": "x" * (64 * 1024)}
    assert _post(url, big).status_code == 413

    def chunks():  # streamed: chunked transfer encoding, no Content-Length to trust
        yield json.dumps(hub_payload(FT))[:-1].encode() + b', "padding": "'
        for _ in range(80):
            yield b"x" * 1024
        yield b'"}'

    response = _post(url, chunks())
    assert response.status_code == 413
    assert "larger than" in response.json()["error"]
    assert recorder.sent == []


@pytest.mark.parametrize(
    "body",
    [
        b"{not json",
        b"\xff\xfe",
        b"[1, 2]",
        b'{"event": "push"}',
        json.dumps(hub_payload("bad name!")).encode(),
    ],
    ids=["syntax", "not-utf8", "not-object", "not-hub-shape", "bad-repo-name"],
)
def test_a_malformed_body_is_400(live, body) -> None:
    url, recorder, _ = live
    response = _post(url, body, **{"Content-Type": "application/json"})
    assert response.status_code == 400
    assert response.json()["error"]
    assert recorder.sent == []


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (hub_payload(repo_type="dataset"), "repo.type 'dataset'"),
        (hub_payload(repo_type="space"), "repo.type 'space'"),
        (hub_payload(ref="refs/heads/dev"), "no update of refs/heads/main"),
        (hub_payload(ref="refs/pr/3"), "no update of refs/heads/main"),
        (hub_payload(sha=None), "refs/heads/main was deleted"),
        (hub_payload(scope="discussion", action="create"), "event.scope 'discussion'"),
        (hub_payload(scope="repo", action="create"), "event.scope 'repo'"),
        (hub_payload(scope="repo.config"), "event.scope 'repo.config'"),
        (hub_payload("someone/never-pushed"), "not found on the Hub"),
        (hub_payload(FT, "0" * 40), "not found on the Hub"),  # unknown revision
        (hub_payload(OTHER), "not a fine-tune or adapter of a watched family"),
        (hub_payload(BASE), "not a fine-tune or adapter"),  # the base model itself
    ],
)
def test_everything_else_is_answered_200_and_ignored(live, payload, reason) -> None:
    url, recorder, _ = live
    response = _post(url, payload)
    assert response.status_code == 200, response.text
    assert reason in response.json()["ignored"]
    assert recorder.sent == []


def test_a_narrower_content_scope_counts_as_repo_content(live) -> None:
    url, recorder, _ = live
    assert _post(url, hub_payload(ADAPTER, scope="repo.content.lfs")).status_code == 202
    assert len(recorder.sent) == 1


def test_a_replayed_delivery_emits_once_even_after_a_restart(tmp_path: Path, live) -> None:
    from flows.webhook import create_app

    url, recorder, receiver = live
    assert _post(url, hub_payload(FT)).status_code == 202
    replay = _post(url, hub_payload(FT))
    assert replay.status_code == 200 and "already announced" in replay.json()["ignored"]
    assert len(recorder.sent) == 2  # two families, once each
    key = f"{FT}@{SHA}"
    assert sorted(receiver.seen.sent()) == [
        (key, "qwen", str(event_id(key, "qwen"))),
        (key, "qwen-ft-only", str(event_id(key, "qwen-ft-only"))),
    ]
    # A new commit of the same repo is a new candidate.
    assert _post(url, hub_payload(FT, SHA2)).status_code == 202
    assert len(recorder.sent) == 4
    # The seen store is a file: a restarted receiver still knows.
    again = Recorder()
    with LiveServer(create_app(_receiver(tmp_path, again))) as server:
        assert _post(server.url, hub_payload(FT)).status_code == 200
        assert _post(server.url, hub_payload(FT, SHA2)).status_code == 200
    assert again.sent == []


def test_concurrent_duplicates_emit_once(live) -> None:
    from concurrent.futures import ThreadPoolExecutor

    url, recorder, _ = live
    with ThreadPoolExecutor(8) as pool:
        codes = sorted(pool.map(lambda _: _post(url, hub_payload(ADAPTER)).status_code, range(8)))
    assert codes == [200] * 7 + [202]
    assert len(recorder.sent) == 1


def test_a_failed_send_is_503_and_the_hubs_retry_emits(tmp_path: Path) -> None:
    from flows.webhook import create_app

    flaky = Recorder(fail=1)
    with LiveServer(create_app(_receiver(tmp_path, flaky))) as server:
        first = _post(server.url, hub_payload(ADAPTER))
        assert first.status_code == 503 and "retry" in first.json()["error"]
        assert flaky.sent == []
        assert _post(server.url, hub_payload(ADAPTER)).status_code == 202
    assert len(flaky.sent) == 1


def test_a_hub_outage_is_503_so_the_hub_retries(tmp_path: Path) -> None:
    from flows.webhook import create_app

    def hub_down(repo: str, revision: str) -> ModelInfo:
        raise ConnectionError("Hub unreachable")

    recorder = Recorder()
    with LiveServer(create_app(_receiver(tmp_path, recorder, model_info=hub_down))) as server:
        assert _post(server.url, hub_payload(FT)).status_code == 503
    assert recorder.sent == []


def test_logs_never_hold_the_secret_or_the_body(live, caplog) -> None:
    import logging

    url, _, _ = live
    caplog.set_level(logging.DEBUG)
    marker = "body-marker-7f3a"
    _post(url, hub_payload(FT) | {"note": marker})
    _post(url, hub_payload(FT), secret="guess-" + SECRET)
    _post(url, b"{" + marker.encode())
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert f"{FT}@{SHA}" in text  # the decision is logged...
    assert SECRET not in text and marker not in text  # ...its inputs are not


# -- the command ---------------------------------------------------------------------------


def _local_only_pipeline(tmp_path: Path) -> Path:
    family = {
        "aligned": str(tmp_path / "aligned"),
        "reference": str(tmp_path / "base"),
        "watch": {"kind": "local", "path": str(tmp_path / "watch")},
        "registered_model": "m",
    }
    path = tmp_path / "local.yaml"
    path.write_text(yaml.safe_dump({"families": {"organism": family}}))
    return path


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        ("local-only", "no family has watch.kind 'hub'"),
        ("no-secret", "environment variable LSSF_WEBHOOK_SECRET is empty or unset"),
        ("no-api", "PREFECT_API_URL is not set"),
    ],
)
def test_serve_refuses_to_start_without_what_it_needs(
    tmp_path, monkeypatch, capsys, setup, message
):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from lssf.cli import main

    config = _local_only_pipeline(tmp_path) if setup == "local-only" else _pipeline(tmp_path)
    if setup != "no-secret":
        monkeypatch.setenv("LSSF_WEBHOOK_SECRET", SECRET)
    else:
        monkeypatch.delenv("LSSF_WEBHOOK_SECRET", raising=False)
    api = None if setup == "no-api" else "http://127.0.0.1:9/api"
    with temporary_settings({PREFECT_API_URL: api}):
        assert main(["webhook", "serve", "--config", str(config), "--port", "9"]) == 2
    err = capsys.readouterr().err
    assert message in err and SECRET not in err


@pytest.mark.slow
def test_lssf_webhook_serve_answers_over_http(tmp_path: Path) -> None:
    """The real command in its own process: secret from the env, the Hub offline -> 503."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import httpx

    port = free_port()
    env = os.environ | {
        "LSSF_WEBHOOK_SECRET": SECRET,
        "PREFECT_API_URL": "http://127.0.0.1:9/api",  # never reached: nothing is emitted
        "HF_HUB_OFFLINE": "1",
    }
    lssf = str(Path(sys.executable).with_name("lssf"))
    command = [lssf, "webhook", "serve", "--config", str(_pipeline(tmp_path)), "--port", str(port)]
    proc = subprocess.Popen(
        command,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                assert time.monotonic() < deadline, "lssf webhook serve did not come up"
                time.sleep(0.3)
        assert _post(url, hub_payload(FT), secret="nope").status_code == 401
        ignored = _post(url, hub_payload(FT, repo_type="dataset"))
        assert ignored.status_code == 200 and "repo.type" in ignored.json()["ignored"]
        assert _post(url, hub_payload(FT)).status_code == 503  # model_info cannot reach the Hub
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    assert f"{FT}@{SHA}" in out  # the decision is logged
    assert SECRET not in out and "license:apache-2.0" not in out


# -- one real run: a local `prefect server start`, the realign deployment, its trigger ------


# The session's server is shared (tests/conftest.py): this test's deployment and work pool
# have names of their own, so that tests/test_deployments.py's `realign` is not counted here.
WEBHOOK_DEPLOYMENT = "realign-webhook-test"


async def _deploy_shipped_realign() -> None:
    """prefect.yaml's realign deployment and its trigger, created as `prefect deploy` does
    (prefect/cli/deploy/_triggers.py), through the API: tests/test_deployments.py already runs
    the CLI, and one more of its processes costs this machine half a minute. Only the names
    differ from the shipped ones (`WEBHOOK_DEPLOYMENT`, the pool's with that suffix)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.events.schemas.deployment_triggers import DeploymentEventTrigger

    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    (realign,) = [d for d in spec["deployments"] if d["name"] == "realign"]
    async with get_client() as client:
        pool = f"{realign['work_pool']['name']}-{WEBHOOK_DEPLOYMENT}"
        await client.create_work_pool(WorkPoolCreate(name=pool, type="process"))
        flow_id = await client.create_flow_from_name("realign")
        deployment_id = await client.create_deployment(
            flow_id=flow_id,
            name=WEBHOOK_DEPLOYMENT,
            entrypoint=realign["entrypoint"],
            work_pool_name=pool,
            path=str(ROOT),
        )
        for spec_trigger in realign["triggers"]:
            trigger = DeploymentEventTrigger.model_validate(spec_trigger)
            trigger.set_deployment_id(deployment_id)
            await client.create_automation(trigger.as_automation())


def _events_with_id(api: str, event_id: str, timeout: float = 30.0) -> list[dict]:
    """The server's stored events of that id; the persister writes in batches, so wait."""
    import time

    import httpx

    deadline = time.monotonic() + timeout
    while True:
        body = {"filter": {"id": {"id": [event_id]}}}
        found = httpx.post(f"{api}/events/filter", json=body, timeout=10).json()["events"]
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.5)


@pytest.mark.slow
def test_a_webhook_delivery_starts_realign_through_the_trigger(
    tmp_path: Path, prefect_api: tuple[str, dict[str, str]]
) -> None:
    """Hub delivery -> receiver -> event on a real Prefect server -> the trigger's realign run."""
    import asyncio
    import time

    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.webhook import create_app
    from tasks.events import send_discovered

    api = prefect_api[0]  # the session's server (tests/conftest.py)
    with temporary_settings({PREFECT_API_URL: api}):
        asyncio.run(_deploy_shipped_realign())
        receiver = _receiver(tmp_path, send_discovered)
        with LiveServer(create_app(receiver)) as hook:
            first = _post(hook.url, hub_payload(ADAPTER))
            assert first.status_code == 202, first.text
            ((emitted),) = first.json()["emitted"]
            deadline = time.monotonic() + 60
            while not (runs := flow_runs(api, WEBHOOK_DEPLOYMENT)) and time.monotonic() < deadline:
                time.sleep(1)
            replay = _post(hook.url, hub_payload(ADAPTER))
    assert replay.status_code == 200 and "already announced" in replay.json()["ignored"]
    # The event is on the server, under the deterministic id...
    found = _events_with_id(api, emitted["event_id"])
    assert [e["resource"]["prefect.resource.id"] for e in found] == [
        f"lssf.finetune.{ADAPTER}@{SHA}"
    ]
    # ...and the realign deployment's trigger turned it into one run with its parameters.
    (run,) = runs
    assert run["parameters"] == {
        "finetuned": f"{ADAPTER}@{SHA}",
        "revision": SHA,
        "family": "qwen",
        "config": receiver.config_ref,
    }
    assert len(flow_runs(api, WEBHOOK_DEPLOYMENT)) == 1
