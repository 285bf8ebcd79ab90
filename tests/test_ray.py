"""nanoengine on Ray: Ray Data actors, `batch --ray`, and the Ray Serve deployment, on one local cluster.

The cluster is started by this module on loopback with 2 CPUs, shared by its tests, and stopped
at the end with every Ray process gone. The model is a tiny random Llama with SmolLM2's
tokenizer: greedy texts are deterministic, so every path must give the single-process texts.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import threading
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

import nanoengine  # noqa: E402
from conftest import save_tiny_llama, wait_until  # noqa: E402

# Ray Serve's own pydantic fields warn on import (ray 2.60, pydantic 2).
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
PROMPTS = [f"Tell me about the number {i}." for i in range(12)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, smollm2_folder) -> str:
    folder = save_tiny_llama(tmp_path_factory.mktemp("ray") / "tiny", vocab_size=49152)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(smollm2_folder / name, folder)
    return str(folder)


def ray_processes(session_dir: str) -> list[int]:
    """Processes of this Ray session: their command lines name its directory."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and session_dir.encode() in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
        except OSError:
            pass
    return found


@pytest.fixture(scope="module")
def cluster():
    """A local Ray on loopback with 2 CPUs; stopped at the end, and no process of it left."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    context = ray.init(
        address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1"
    )
    session_dir = context.address_info["session_dir"]
    try:
        yield context
    finally:
        from ray import serve

        serve.shutdown()
        ray.shutdown()
        assert wait_until(lambda: not ray_processes(session_dir), 60), f"Ray processes left: {ray_processes(session_dir)}"


def test_map_batches_with_two_actors_gives_the_single_process_texts(cluster, tiny):
    from nanoengine.ray import NanoEngineGenerate

    sampling = {"max_new_tokens": 8, "temperature": 0}
    ds = ray.data.from_items([{"prompt": p, "row": i} for i, p in enumerate(PROMPTS)])
    ds = ds.map_batches(NanoEngineGenerate, fn_constructor_kwargs={"model": tiny, **sampling},
                        compute=ray.data.ActorPoolStrategy(size=2), batch_size=3, num_cpus=1)  # fmt: skip
    rows = sorted(ds.take_all(), key=lambda row: row["row"])
    single = nanoengine.load(tiny).generate(PROMPTS, **sampling)
    assert [row["generated_text"] for row in rows] == [o.text for o in single]
    assert [row["num_completion_tokens"] for row in rows] == [o.num_completion_tokens for o in single]


def test_batch_on_ray_writes_the_single_process_answers_and_resumes(cluster, tiny, tmp_path):
    from nanoengine.ray import run_batch_on_ray

    lines = [{"custom_id": f"p{i}", "prompt": p} for i, p in enumerate(PROMPTS)] + ["{not json"]
    source = tmp_path / "in.jsonl"
    source.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    single = tmp_path / "single.jsonl"
    nanoengine.load(tiny).run_batch(source, single, max_new_tokens=6, temperature=0)
    out = tmp_path / "ray.jsonl"
    kept = single.read_text().splitlines(keepends=True)
    out.write_text("".join(kept[:4]) + kept[4][:30])  # as a crash leaves it: 4 answers and a torn line
    summary = run_batch_on_ray(tiny, source, out, actors=2, lines_per_batch=4, progress=False, max_new_tokens=6, temperature=0)
    assert (summary.already_done, summary.succeeded + summary.failed) == (4, len(lines) - 4)

    def answers(path: Path) -> dict:
        records = [json.loads(line) for line in path.read_text().splitlines()]
        assert len(records) == len(lines)  # each input line exactly once
        return {r["custom_id"] or r["line"]: (r["response"] or {}).get("body", {}).get("output", {}).get("text") for r in records}

    assert answers(out) == answers(single)


@pytest.fixture(scope="module")
def served(cluster, tiny):
    """The Serve deployment, 2 replicas of half a CPU each, on a free loopback port; its base URL."""
    from ray import serve

    from nanoengine.ray import server_app
    from nanoengine.server.common import ServerSettings

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(server_app(ServerSettings(models={"tiny": tiny}), num_replicas=2, num_cpus=0.5), name="nanoengine")
    yield f"http://127.0.0.1:{port}/"
    serve.delete("nanoengine")


def replica_names() -> set[str]:
    return {
        a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith("SERVE_REPLICA::")
    }


def test_two_replicas_answer_the_openai_and_llmengine_clients(served, tiny, monkeypatch):
    import openai

    monkeypatch.setenv("LLM_ENGINE_BASE_PATH", served)
    monkeypatch.setenv("LLM_ENGINE_DISABLE_VERSION_CHECK", "true")
    import llmengine

    llm = nanoengine.load(tiny)
    expected = [o.text for o in llm.generate(PROMPTS[:4], max_new_tokens=6, temperature=0)]
    client = openai.OpenAI(base_url=f"{served}v1", api_key="unused", max_retries=0)
    texts = [client.completions.create(model="tiny", prompt=p, max_tokens=6, temperature=0).choices[0].text for p in PROMPTS[:4]]
    assert texts == expected
    messages = [{"role": "user", "content": "Hi"}]
    chat = client.chat.completions.create(model="tiny", messages=messages, max_tokens=5, temperature=0)
    assert chat.choices[0].message.content == llm.chat(messages, max_new_tokens=5, temperature=0).text
    assert llmengine.Completion.create(model="tiny", prompt=PROMPTS[0], max_new_tokens=6, temperature=0).output.text == expected[0]
    streamed = llmengine.Completion.create(model="tiny", prompt=PROMPTS[1], max_new_tokens=6, temperature=0, stream=True)
    assert "".join(chunk.output.text for chunk in streamed) == expected[1]
    assert [m.name for m in llmengine.Model.list().model_endpoints] == ["tiny"]


def test_a_replica_killed_mid_run_is_replaced_and_later_requests_are_served(served, tiny):
    import openai

    client = openai.OpenAI(base_url=f"{served}v1", api_key="unused", max_retries=0)
    before = replica_names()
    assert len(before) == 2
    started, outcomes = threading.Semaphore(0), []

    def stream_one(prompt: str) -> None:
        try:
            chunks = client.completions.create(model="tiny", prompt=prompt, max_tokens=200, temperature=0, stream=True)
            for i, _ in enumerate(chunks):
                if i == 0:
                    started.release()
            outcomes.append("done")
        except Exception as err:  # the killed replica's streams break
            started.release()
            outcomes.append(type(err).__name__)

    streams = [threading.Thread(target=stream_one, args=(p,)) for p in PROMPTS[:4]]
    for thread in streams:
        thread.start()
    for _ in streams:  # every stream has begun: the replicas are mid-run
        assert started.acquire(timeout=120)
    victim = sorted(before)[0]
    ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
    for thread in streams:
        thread.join(120)
    assert len(outcomes) == 4
    assert wait_until(lambda: len(replica_names() - {victim}) == 2 and healthy(), 180), "the replica was not replaced"
    expected = [o.text for o in nanoengine.load(tiny).generate(PROMPTS[4:8], max_new_tokens=6, temperature=0)]
    texts = [client.completions.create(model="tiny", prompt=p, max_tokens=6, temperature=0).choices[0].text for p in PROMPTS[4:8]]
    assert texts == expected


def healthy() -> bool:
    from ray import serve

    deployment = serve.status().applications["nanoengine"].deployments["nanoengine"]
    return deployment.status == "HEALTHY" and deployment.replica_states == {"RUNNING": 2}
