"""`threedis serve` over real HTTP and WebSocket: a uvicorn server on 127.0.0.1 with the tiny checkpoints.

Renders are 1-4 steps at 64x64 on uploaded depth maps (no stage 1) so the file stays
fast; the long "running" jobs are cancelled after their first step event, so no test
depends on timing. Bounds (timeouts) only stop a broken run from hanging.
"""

from __future__ import annotations

import errno
import io
import json
import os
from pathlib import Path

import pytest

pytest.importorskip("fastapi")  # the serve extra is part of the test extra; CI installs it
import httpx  # noqa: E402
from PIL import Image  # noqa: E402

from serve_helpers import EventLog, free_port, layout_dict, png_bytes, running_service, tree, wait_final  # noqa: E402

TOKEN = "test-token-123"
ALLOWED = "http://localhost:3000"
LONG = 1000  # steps (the most a job may ask for) of a job that is cancelled long before it ends


def _config(out: Path, **changes):
    from threedis.engine.serve import ServeConfig

    values = dict(out=out, host="127.0.0.1", port=free_port(), token=TOKEN, allow_origins=(ALLOWED,),
                  max_upload_bytes=300_000, max_upload_pixels=1024 * 1024)
    values.update(changes)
    return ServeConfig(**values)


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    """(base url, httpx client with the token, out folder, config, app) of one service for the module."""
    out = tmp_path_factory.mktemp("serve-out")
    config = _config(out, lora_dir=tmp_path_factory.mktemp("serve-loras"), max_lora_bytes=200_000)
    with running_service(config) as (url, app):
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60) as client:
            yield url, client, out, config, app


def _upload(client, data: bytes, kind: str = "depth", filename: str = "depth.png"):
    return client.post("/api/v1/uploads", files={"file": (filename, data, "image/png")}, data={"kind": kind})


@pytest.fixture(scope="module")
def depth_id(service):
    _, client, _, _, _ = service
    answer = _upload(client, png_bytes())
    assert answer.status_code == 201, answer.text
    return answer.json()["id"]


def _job(depth_id: str, steps: int = 1, seed: int = 0, size: int = 64, **options) -> dict:
    return {"layout": layout_dict(size), "options": {"steps": steps, "seed": seed, "preview": True,
                                                 "depth": {"source": "upload", "upload": depth_id}, **options}}


def _healthy(client) -> None:
    answer = client.get("/api/v1/system")
    assert answer.status_code == 200 and answer.json()["tiny"] is True


# ---------------------------------------------------------------------------- a render end to end


def test_submit_events_done_and_image_metadata_holds_the_layout(service, depth_id, monkeypatch):
    url, client, out, _, app = service
    jobs, hub = app.state.jobs, app.state.hub
    at_publish: dict[str, dict] = {}  # what GET /jobs/{id} says at the instant each final event goes out
    publish = hub.publish

    def publish_and_look(event):
        if event["type"] in ("done", "failed"):
            at_publish[event["type"]] = jobs.job(event["job"])
        publish(event)

    monkeypatch.setattr(hub, "publish", publish_and_look)
    events = EventLog(url, TOKEN)
    try:
        assert events.wait_for(lambda e: e["type"] == "snapshot")["type"] == "snapshot"
        body = _job(depth_id, steps=3)
        answer = client.post("/api/v1/jobs", json=body)
        assert answer.status_code == 202, answer.text
        job_id = answer.json()["id"]
        done = events.wait_for(lambda e: e.get("job") == job_id and e["type"] in ("done", "failed"))
        assert done["type"] == "done", done
        kinds = [e["type"] for e in events.of(job_id)]
        assert kinds[0] == "queued" and "started" in kinds and kinds[-1] == "done"
        steps = [e for e in events.of(job_id) if e["type"] == "step"]
        assert [e["step"] for e in steps] == [1, 2, 3] and all(e["total"] == 3 for e in steps)
        assert all(e["stage"] == "denoise" and e["status"] == "running" for e in steps)
        assert any(e.get("preview", "").startswith("data:image/png;base64,") for e in steps)
        assert steps[0]["eta_s"] is None and steps[1]["eta_s"] >= 0 and steps[-1]["eta_s"] == 0
    finally:
        events.close()
    # The worker stopped counting the job as running before it told anyone the job was done (once, it
    # published first: a client quick enough saw status "done" with position 0).
    assert at_publish["done"]["status"] == "done" and at_publish["done"]["position"] is None
    assert at_publish["done"]["stage"] is None and jobs.running != job_id
    job = client.get(f"/api/v1/jobs/{job_id}").json()
    assert job["status"] == "done" and job["error"] is None and job["position"] is None
    assert {"image.png", "depth.png", "layout.png", "report.json", "regions.png"} <= set(job["files"])
    assert job["report"] is not None and "stages" in job["report"]
    png = client.get(job["files"]["image.png"])
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    with Image.open(io.BytesIO(png.content)) as image:
        meta = json.loads(image.text["threedis"])
    sent = body["layout"]
    assert meta["layout"]["prompt"] == sent["prompt"]
    assert (meta["layout"]["width"], meta["layout"]["height"]) == (sent["width"], sent["height"])
    assert [i["prompt"] for i in meta["layout"]["instances"]] == [i["prompt"] for i in sent["instances"]]
    assert [i["box"] for i in meta["layout"]["instances"]] == [i["box"] for i in sent["instances"]]
    assert meta["seed"] == 0 and meta["steps"] == 3
    assert (out / "jobs" / job_id / "image.png").is_file()
    assert client.get("/api/v1/jobs").json()["jobs"][0]["id"] == job_id  # newest first


def test_twenty_jobs_from_two_clients_keep_their_order(service, depth_id):
    url, client, _, _, _ = service
    second = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60)
    watchers = [EventLog(url, TOKEN), EventLog(url, TOKEN)]
    try:
        for w in watchers:
            w.wait_for(lambda e: e["type"] == "snapshot")
        # a long job first, so that all 20 are really queued behind it
        blocker = client.post("/api/v1/jobs", json=_job(depth_id, steps=LONG)).json()["id"]
        watchers[0].wait_for(lambda e: e.get("job") == blocker and e["type"] == "step")
        ids, positions = [], []
        for i in range(20):
            answer = (client if i % 2 == 0 else second).post("/api/v1/jobs", json=_job(depth_id, seed=i, size=32))
            assert answer.status_code == 202, answer.text
            ids.append(answer.json()["id"])
            positions.append(answer.json()["position"])
        assert positions == list(range(1, 21))
        assert client.get(f"/api/v1/jobs/{ids[4]}").json()["position"] == 5
        assert client.post(f"/api/v1/jobs/{blocker}/cancel").json()["cancel_requested"] is True
        for w in watchers:
            w.wait_for(lambda e: e.get("job") == ids[-1] and e["type"] in ("done", "failed"), timeout=300)
        for w in watchers:  # every client saw every job start in submission order and finish
            started = [e["job"] for e in w.events if e["type"] == "started" and e["job"] in ids]
            finished = [e["job"] for e in w.events if e["type"] == "done" and e["job"] in ids]
            assert started == ids and finished == ids
        records = {job["id"]: job for job in client.get("/api/v1/jobs").json()["jobs"]}
        assert all(records[i]["status"] == "done" for i in ids)
        starts = [records[i]["started"] for i in ids]
        assert starts == sorted(starts)
        assert records[blocker]["status"] == "cancelled"
    finally:
        for w in watchers:
            w.close()
        second.close()


def test_cancel_a_queued_and_a_running_job(service, depth_id):
    url, client, _, _, _ = service
    events = EventLog(url, TOKEN)
    try:
        running = client.post("/api/v1/jobs", json=_job(depth_id, steps=LONG)).json()["id"]
        queued = client.post("/api/v1/jobs", json=_job(depth_id)).json()["id"]
        events.wait_for(lambda e: e.get("job") == running and e["type"] == "step")
        answer = client.post(f"/api/v1/jobs/{queued}/cancel")
        assert answer.status_code == 200 and answer.json()["status"] == "cancelled"
        assert client.get(f"/api/v1/jobs/{queued}").json()["status"] == "cancelled"  # at once, not later
        answer = client.post(f"/api/v1/jobs/{running}/cancel")
        assert answer.status_code == 200 and answer.json()["status"] == "running"
        events.wait_for(lambda e: e.get("job") == running and e["type"] == "cancelled")
        job = client.get(f"/api/v1/jobs/{running}").json()
        assert job["status"] == "cancelled" and job["finished"] is not None and job["files"] == {}
        assert client.get(f"/api/v1/jobs/{queued}").json()["started"] is None
        assert [e["type"] for e in events.of(queued)] == ["queued", "cancelled"]
        again = client.post(f"/api/v1/jobs/{queued}/cancel")
        assert again.status_code == 409 and "already cancelled" in again.json()["detail"]["message"]
        resubmitted = client.post(f"/api/v1/jobs/{queued}/resubmit")
        assert resubmitted.status_code == 202
        assert wait_final(client, resubmitted.json()["id"])["status"] == "done"
    finally:
        events.close()


def test_depth_job_then_render_on_its_depth(service):
    _, client, _, _, _ = service
    stage1 = {"source": "stage1", "stage1": {"steps": 1, "size": 64, "refine_steps": 0}}
    answer = client.post("/api/v1/depth", json={"layout": layout_dict(), "options": {"seed": 1, "depth": stage1}})
    assert answer.status_code == 202, answer.text
    depth_job = wait_final(client, answer.json()["id"])
    assert depth_job["status"] == "done", depth_job["error"]
    assert depth_job["options"]["depth"]["stage1"]["refine_steps"] == 0
    assert set(depth_job["files"]) == {"depth.png", "stage1-rgb.png", "report.json"}
    with Image.open(io.BytesIO(client.get(depth_job["files"]["depth.png"]).content)) as depth:
        assert depth.size == (64, 64)
    body = {"layout": layout_dict(), "options": {"steps": 1, "depth": {"source": "job", "job": depth_job["id"]}}}
    render = wait_final(client, client.post("/api/v1/jobs", json=body).json()["id"])
    assert render["status"] == "done", render["error"]


def test_depth_from_an_uploaded_photo_as_a_job_and_in_a_render(service):
    _, client, _, _, _ = service
    photo = _upload(client, png_bytes((80, 48), "RGB"), kind="photo").json()["id"]
    source = {"source": "photo", "upload": photo}
    depth_job = wait_final(client, client.post("/api/v1/depth", json={"layout": layout_dict(32), "options": {
        "depth": source}}).json()["id"])
    assert depth_job["status"] == "done", depth_job["error"]
    assert set(depth_job["files"]) == {"depth.png", "report.json"}
    with Image.open(io.BytesIO(client.get(depth_job["files"]["depth.png"]).content)) as depth:
        assert depth.size == (32, 32)
    render = wait_final(client, client.post("/api/v1/jobs", json={"layout": layout_dict(32), "options": {
        "steps": 1, "depth": source}}).json()["id"])
    assert render["status"] == "done", render["error"]
    wrong_kind = client.post("/api/v1/jobs", json={"layout": layout_dict(32), "options": {
        "depth": {"source": "upload", "upload": photo}}})
    assert wrong_kind.status_code == 422 and "photo" in wrong_kind.json()["detail"]["message"]


def test_a_photo_depth_job_needs_no_prompts(service):
    _, client, _, _, _ = service
    photo = _upload(client, png_bytes((80, 48), "RGB"), kind="photo").json()["id"]
    empty = {"prompt": "", "width": 32, "height": 48, "instances": [{"prompt": "", "box": [0.1, 0.1, 0.6, 0.6]}]}
    answer = client.post("/api/v1/depth", json={"layout": empty, "options": {"depth": {"source": "photo",
                                                                                     "upload": photo}}})
    assert answer.status_code == 202, answer.text
    job = wait_final(client, answer.json()["id"])
    assert job["status"] == "done", job["error"]
    with Image.open(io.BytesIO(client.get(job["files"]["depth.png"]).content)) as depth:
        assert depth.size == (32, 48)
    stage1 = client.post("/api/v1/depth", json={"layout": empty, "options": {"depth": {"source": "stage1"}}})
    assert stage1.status_code == 422  # stage 1 draws from the prompts: they are needed there
    problems = stage1.json()["detail"]["problems"]
    assert {p["field"] for p in problems} == {"prompt", "instances[0].prompt"}
    for problem in problems:  # and the refusal says why, and what needs no prompt
        assert problem["message"].startswith("is empty; stage 1 makes the depth from the prompts"), problem
        assert "a depth from a photo or an uploaded one needs none" in problem["message"]
    assert "stage 1 makes the depth from the prompts" in stage1.json()["detail"]["message"]
    bad_size = client.post("/api/v1/depth", json={"layout": {**empty, "width": 33}, "options": {
        "depth": {"source": "photo", "upload": photo}}})
    assert bad_size.status_code == 422 and [p["field"] for p in bad_size.json()["detail"]["problems"]] == ["width"]


def test_seeds_take_the_engines_whole_range(service, depth_id):
    from threedis.engine.checks import SEED_MAX

    _, client, _, _, _ = service
    demo_seed = 11279306965410786290  # the authors' demo seed: above 2^63, within torch's 2^64
    job = wait_final(client, client.post("/api/v1/jobs", json=_job(depth_id, seed=demo_seed)).json()["id"])
    assert job["status"] == "done", job["error"]
    assert job["options"]["seed"] == demo_seed
    with Image.open(io.BytesIO(client.get(job["files"]["image.png"]).content)) as image:
        assert json.loads(image.text["threedis"])["seed"] == demo_seed
    ok = client.post("/api/v1/depth", json={"layout": layout_dict(), "options": {
        "seed": SEED_MAX, "depth": {"source": "stage1", "stage1": {"steps": 1, "size": 64, "seed": SEED_MAX}}}})
    assert ok.status_code == 202, ok.text
    assert client.post(f"/api/v1/jobs/{ok.json()['id']}/cancel").status_code in (200, 409)
    for seed, field in ((SEED_MAX + 1, "options.seed"), (-1, "options.seed"), (1.5, "options.seed"),
                        (True, "options.seed")):
        answer = client.post("/api/v1/jobs", json=_job(depth_id, seed=seed))
        assert answer.status_code == 422, seed
        problem = answer.json()["detail"]["problems"][0]
        assert problem["field"] == field and "18446744073709551615" in problem["message"], problem
    stage1 = {"source": "stage1", "stage1": {"seed": SEED_MAX + 1}}
    answer = client.post("/api/v1/jobs", json={"layout": layout_dict(), "options": {"depth": stage1}})
    assert answer.status_code == 422
    assert answer.json()["detail"]["problems"][0]["field"] == "options.depth.stage1.seed"


def test_an_upload_the_service_cannot_store_is_507_and_leaves_nothing(service, unwritable):
    """The service's disk (full, read-only), not the client's mistake: 507, one message, no temp file."""
    _, client, _, _, app = service
    stores = (app.state.uploads, "folder"), (app.state.jobs.loras, "uploads_dir")
    kept = [getattr(store, name) for store, name in stores]
    try:
        for store, name in stores:
            setattr(store, name, unwritable)
        image = _upload(client, png_bytes())
        lora = client.post("/api/v1/loras", files={"file": ("x.safetensors", _lora_bytes(service, good=True))})
    finally:
        for (store, name), value in zip(stores, kept):
            setattr(store, name, value)
    for answer, words in ((image, "cannot store the upload"), (lora, "cannot store the LoRA")):
        assert answer.status_code == 507 and words in answer.json()["detail"]["message"], answer.text
    assert list(unwritable.iterdir()) == []


def test_the_job_list_pages_and_filters(service, depth_id):
    _, client, _, _, _ = service
    everything = client.get("/api/v1/jobs").json()
    assert everything["total"] == len(everything["jobs"]) >= 3
    first = client.get("/api/v1/jobs", params={"limit": 2}).json()
    second = client.get("/api/v1/jobs", params={"limit": 2, "offset": 2}).json()
    beyond = client.get("/api/v1/jobs", params={"offset": 10**23})  # past SQLite's integers: an empty page
    assert beyond.status_code == 200 and beyond.json()["jobs"] == [], beyond.text
    assert [j["id"] for j in first["jobs"] + second["jobs"]] == [j["id"] for j in everything["jobs"][:4]]
    done = client.get("/api/v1/jobs", params={"status": "done", "kind": "render"}).json()
    assert done["total"] == sum(1 for j in everything["jobs"] if j["status"] == "done" and j["kind"] == "render")
    assert all(j["status"] == "done" and j["kind"] == "render" for j in done["jobs"])
    ended = client.get("/api/v1/jobs", params={"status": "failed,cancelled"}).json()
    assert {j["status"] for j in ended["jobs"]} <= {"failed", "cancelled"}
    for params, field in (({"status": "finished"}, "status"), ({"kind": "video"}, "kind")):
        answer = client.get("/api/v1/jobs", params=params)
        assert answer.status_code == 422 and answer.json()["detail"]["problems"][0]["field"] == field


def _lora_bytes(service, good: bool) -> bytes:
    """A diffusers-format LoRA for the tiny transformer (good) or one whose shapes fit no FLUX (not good)."""
    from safetensors.torch import save as save_tensors
    import torch

    from test_api import write_lora

    _, _, _, _, app = service
    if not good:
        return save_tensors({"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 7),
                             "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(5, 4)})
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        write_lora(Path(tmp) / "good.safetensors", app.state.jobs.engine.components.transformer, seed=1)
        return (Path(tmp) / "good.safetensors").read_bytes()


def test_a_failing_render_records_its_error_and_the_service_stays_up(service, depth_id):
    _, client, _, config, _ = service
    (config.lora_dir / "misfit.safetensors").write_bytes(_lora_bytes(service, good=False))
    job_id = client.post("/api/v1/jobs", json=_job(depth_id, loras=[{"name": "misfit.safetensors"}])).json()["id"]
    job = wait_final(client, job_id)
    assert job["status"] == "failed" and job["error"] and "\n" not in job["error"]
    assert "misfit.safetensors" in job["error"] and str(config.lora_dir) not in job["error"]  # its name, not its path
    assert wait_final(client, client.post("/api/v1/jobs", json=_job(depth_id)).json()["id"])["status"] == "done"


def _nested_header(depth: int) -> bytes:
    header = b"[" * depth + b"]" * depth
    return len(header).to_bytes(8, "little") + header


def test_loras_by_name_from_the_folder_or_uploaded_never_by_path(service, depth_id, tmp_path):
    url, client, _, config, _ = service
    good = _lora_bytes(service, good=True)
    (config.lora_dir / "style.safetensors").write_bytes(good)
    (config.lora_dir / "notes.txt").write_text("not a LoRA")
    (config.lora_dir / "folder-lora").mkdir()  # a diffusers LoRA folder: offered under its folder's name
    (config.lora_dir / "folder-lora" / "pytorch_lora_weights.safetensors").write_bytes(good)
    (config.lora_dir / "two-files").mkdir()  # which of two? not offered
    for name in ("a.safetensors", "b.safetensors"):
        (config.lora_dir / "two-files" / name).write_bytes(good)
    listed = client.get("/api/v1/loras").json()
    assert {"name": "style.safetensors", "bytes": len(good)} in listed["named"]
    assert {"name": "folder-lora", "bytes": len(good)} in listed["named"]
    assert not {"notes.txt", "two-files"} & {item["name"] for item in listed["named"]}

    uploaded = client.post("/api/v1/loras", files={"file": ("../../My Style!.safetensors", good)})
    assert uploaded.status_code == 201, uploaded.text
    upload = uploaded.json()
    assert upload["name"] == "My Style_.safetensors" and upload["bytes"] == len(good)
    assert upload in client.get("/api/v1/loras").json()["uploaded"]
    from threedis.client import Client

    file = tmp_path / "by-client.safetensors"
    file.write_bytes(good)
    python = Client(url, TOKEN)
    by_client = python.upload_lora(file)
    assert {"upload": by_client, "name": "by-client.safetensors", "bytes": len(good)} in python.loras()["uploaded"]
    for data, status, words in ((b"PK\x03\x04 a zip, not safetensors", 422, "not a LoRA file"),
                                (_lora_bytes(service, good=False)[:40], 422, "not a LoRA file"),
                                (b"x" * (config.max_lora_bytes + 1), 413, "--max-lora-mb"),
                                (_nested_header(5000), 422, "not a LoRA file")):  # a nesting bomb, not a 500
        refused = client.post("/api/v1/loras", files={"file": ("x.safetensors", data)})
        assert refused.status_code == status and words in refused.json()["detail"]["message"], refused.text
    from safetensors.torch import save as save_tensors
    import torch

    no_lora = client.post("/api/v1/loras", files={"file": ("x.safetensors", save_tensors({"w": torch.zeros(2)}))})
    assert no_lora.status_code == 422 and "no LoRA weights" in no_lora.json()["detail"]["message"]

    # A path is refused with the same words whether or not it exists: the answer says nothing of the machine.
    answers = []
    existing = tmp_path / "real.safetensors"
    existing.write_bytes(good)
    for path in (str(existing), str(tmp_path / "missing.safetensors"), "/etc/passwd"):
        answer = client.post("/api/v1/jobs", json=_job(depth_id, loras=[{"path": path}]))
        assert answer.status_code == 422
        answers.append(answer.json()["detail"]["problems"])
    assert answers[0] == answers[1] == answers[2] and answers[0][0]["field"] == "options.loras[0].path"
    for name in ("../style.safetensors", "nope.safetensors", str(config.lora_dir / "style.safetensors")):
        answer = client.post("/api/v1/jobs", json=_job(depth_id, loras=[{"name": name}]))
        assert answer.status_code == 422 and answer.json()["detail"]["problems"][0]["field"] == "options.loras[0].name"

    plain = wait_final(client, client.post("/api/v1/jobs", json=_job(depth_id, seed=5)).json()["id"])
    named = wait_final(client, client.post("/api/v1/jobs", json=_job(
        depth_id, seed=5, loras=[{"name": "style.safetensors", "scale": 1.5}])).json()["id"])
    by_upload = wait_final(client, client.post("/api/v1/jobs", json=_job(
        depth_id, seed=5, loras=[{"upload": upload["upload"], "scale": 1.5}])).json()["id"])
    images = {}
    for job in (plain, named, by_upload):
        assert job["status"] == "done", job["error"]
        images[job["id"]] = client.get(job["files"]["image.png"]).content
    with Image.open(io.BytesIO(images[plain["id"]])) as a, Image.open(io.BytesIO(images[named["id"]])) as b, \
            Image.open(io.BytesIO(images[by_upload["id"]])) as c:
        import numpy as np

        assert np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).max() > 0, "the LoRA changed nothing"
        assert np.abs(np.asarray(b, np.int16) - np.asarray(c, np.int16)).max() <= 1  # the same file, two ways
        again = wait_final(client, client.post("/api/v1/jobs", json=_job(depth_id, seed=5)).json()["id"])
        with Image.open(io.BytesIO(client.get(again["files"]["image.png"]).content)) as d:  # LoRAs unloaded again
            assert np.abs(np.asarray(a, np.int16) - np.asarray(d, np.int16)).max() <= 1


def test_an_unexpected_exception_fails_the_job_not_the_service(service, depth_id, monkeypatch):
    _, client, _, _, app = service
    engine = app.state.jobs.engine

    def broken(*args, **kwargs):
        raise RuntimeError("simulated bug\nwith a second line")

    monkeypatch.setattr(engine, "render", broken)
    job = wait_final(client, client.post("/api/v1/jobs", json=_job(depth_id)).json()["id"])
    assert job["status"] == "failed" and "RuntimeError" in job["error"] and "service log" in job["error"]
    monkeypatch.undo()
    assert wait_final(client, client.post("/api/v1/jobs", json=_job(depth_id)).json()["id"])["status"] == "done"


def test_mask_uploads_reach_the_render(service, depth_id):
    _, client, _, _, _ = service
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (4, 8, 30, 50))
    buffer = io.BytesIO()
    mask.save(buffer, format="PNG")
    mask_id = _upload(client, buffer.getvalue(), kind="mask").json()["id"]
    body = _job(depth_id)
    body["layout"]["instances"][0]["mask"] = {"mask_upload": mask_id}
    job = wait_final(client, client.post("/api/v1/jobs", json=body).json()["id"])
    assert job["status"] == "done", job["error"]
    assert "mask-0.png" in job["files"] and "mask-1.png" not in job["files"]
    assert job["layout"]["instances"][0]["mask"] == {"mask_upload": mask_id}  # stored as sent, for resubmit


# ---------------------------------------------------------------------------- bad requests


def test_bad_layout_gets_422_with_every_problem_as_validate_words_them(service, depth_id):
    from threedis import Layout, LayoutError

    _, client, _, _, _ = service
    bad = {"prompt": "", "width": 65, "height": 64,
           "instances": [{"prompt": "ok", "box": [0.1, 0.1, 0.5, 0.5]}, {"prompt": "x", "box": [0.6, 0, 0.2, 1]}]}
    answer = client.post("/api/v1/jobs", json={"layout": bad, "options": {"steps": 0, "depth": {"source": "upload",
                                                                                             "upload": depth_id}}})
    assert answer.status_code == 422
    problems = answer.json()["detail"]["problems"]
    with pytest.raises(LayoutError) as err:
        Layout.from_dict(bad)
    expected = [str(p) for p in err.value.problems]  # what `threedis validate` prints, one per line
    layout_problems = [p for p in problems if not p["field"].startswith("options")]
    assert [f"{p['field']}: {p['message']}" for p in layout_problems] == expected
    assert {p["field"] for p in layout_problems} == {"prompt", "width", "instances[1].box"}
    assert {"field": "options.steps", "message": "must be a whole number from 1 to 1000, got 0"} in problems
    assert answer.json()["detail"]["message"].startswith("invalid layout: prompt:")
    _healthy(client)


@pytest.mark.parametrize("body, field", [
    ({"layout": "not an object"}, ""),
    ({"options": {}}, "layout"),
    ({"layout": layout_dict(), "options": {"depth": {"source": "upload", "upload": "../../etc/passwd"}}},
     "options.depth.upload"),
    ({"layout": layout_dict(), "options": {"depth": {"source": "nowhere"}}}, "options.depth.source"),
    ({"layout": layout_dict(), "options": {"depth": {"source": "upload", "path": "/etc/passwd"}}},
     "options.depth.path"),
    ({"layout": layout_dict(), "options": {"depth": {"source": "photo"}}}, "options.depth.upload"),
    ({"layout": layout_dict(), "options": {"schedule": {"i2i": -1}}}, "options.schedule.i2i"),
    ({"layout": layout_dict(), "options": {"steps": 4, "schedule": {"hard": 5}}}, "options.schedule.hard"),
    ({"layout": {**layout_dict(), "instances": [{"prompt": "a", "box": [0, 0, 1, 1], "mask": "/etc/passwd"}]}},
     "instances[0].mask"),
    ({"layout": layout_dict(), "colour": "red"}, "colour"),
    ({"layout": layout_dict(), "options": {"depth": {"source": "stage1", "stage1": {"refine_steps": -1}}}},
     "options.depth.stage1.refine_steps"),
])
def test_bad_job_bodies_get_a_4xx_naming_the_field(service, body, field):
    _, client, _, _, _ = service
    answer = client.post("/api/v1/jobs", json=body)
    assert answer.status_code == 422, answer.text
    detail = answer.json()["detail"]
    assert detail["message"] and field in [p["field"] for p in detail["problems"]]
    assert "'None'" not in detail["message"], detail  # a missing id is said to be missing


def test_not_json_and_oversized_json_are_refused(service):
    _, client, _, config, _ = service
    answer = client.post("/api/v1/jobs", content=b"{nope", headers={"Content-Type": "application/json"})
    assert answer.status_code == 422 and answer.json()["detail"]["message"]
    big = {"layout": {**layout_dict(), "prompt": "x" * (config.max_json_bytes + 10)}}
    answer = client.post("/api/v1/jobs", json=big)
    assert answer.status_code == 413 and "too large" in answer.json()["detail"]["message"]
    _healthy(client)


def test_bad_uploads_are_refused_with_a_message(service):
    _, client, out, config, _ = service
    oversized = png_bytes((400, 400), "RGB") + b"\0" * config.max_upload_bytes
    cases = {
        "oversized": (_upload(client, oversized), 413),
        "not an image": (_upload(client, b"GIF89a but not really" * 50), 422),
        "truncated": (_upload(client, png_bytes()[:60]), 422),
        "too many pixels": (_upload(client, png_bytes((1100, 1000))), 413),
        "wrong kind": (_upload(client, png_bytes(), kind="../../evil"), 422),
        "no file": (client.post("/api/v1/uploads", data={"kind": "depth"}), 422),
    }
    bomb = io.BytesIO()
    Image.new("1", (20_000, 20_000)).save(bomb, format="PNG")  # ~400 M pixels in a few dozen KB
    assert len(bomb.getvalue()) < config.max_upload_bytes
    cases["decompression bomb"] = (_upload(client, bomb.getvalue(), kind="mask"), 413)
    for name, (answer, status) in cases.items():
        assert answer.status_code == status, (name, answer.status_code, answer.text)
        assert answer.json()["detail"]["message"], name
    _healthy(client)


def test_client_file_names_and_paths_never_reach_the_file_system(service, depth_id):
    _, client, out, _, _ = service
    before = set(tree(out))
    answer = _upload(client, png_bytes(), filename="../../../escaped.png")
    assert answer.status_code == 201
    upload_id = answer.json()["id"]
    assert set(tree(out)) - before == {f"uploads/{upload_id}.png"}  # the only new file, under a generated name
    assert not any(p.name == "escaped.png" for p in out.parent.rglob("*"))
    assert client.get(f"/api/v1/uploads/{upload_id}").status_code == 200
    for path in ("/api/v1/uploads/..%2Fhistory.sqlite3", "/api/v1/uploads/%2E%2E",
                 "/api/v1/jobs/..%2F..%2Fhistory.sqlite3/files/x", "/api/v1/uploads/" + "a" * 32):
        assert client.get(path).status_code == 404, path
    job_id = client.post("/api/v1/jobs", json=_job(depth_id, size=32)).json()["id"]
    assert wait_final(client, job_id)["status"] == "done"
    assert client.get(f"/api/v1/jobs/{job_id}/files/image.png").status_code == 200
    for name in ("..%2Fhistory.sqlite3", "%2E%2E%2F%2E%2E%2Fhistory.sqlite3", "image.png%00"):
        assert client.get(f"/api/v1/jobs/{job_id}/files/{name}").status_code == 404, name


# ---------------------------------------------------------------------------- security


def test_token_host_and_origin_checks(service):
    url, client, _, config, _ = service
    plain = httpx.Client(base_url=url, timeout=30)
    try:
        assert plain.get("/api/v1/system").status_code == 401
        wrong = plain.get("/api/v1/system", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and "token" in wrong.json()["detail"]["message"]
        for host in ("evil.example", f"evil.example:{config.port}", "127.0.0.1:1"):
            answer = client.get("/api/v1/system", headers={"Host": host})
            assert answer.status_code == 421, host
        assert client.get("/api/v1/system", headers={"Host": f"localhost:{config.port}"}).status_code == 200
        foreign = client.post("/api/v1/jobs", json={"layout": layout_dict()}, headers={"Origin": "http://evil.example"})
        assert foreign.status_code == 403 and "--allow-origin" in foreign.json()["detail"]["message"]
        assert client.get("/api/v1/system", headers={"Origin": url}).status_code == 200  # the page itself
        allowed = client.get("/api/v1/system", headers={"Origin": ALLOWED})
        assert allowed.status_code == 200 and allowed.headers["access-control-allow-origin"] == ALLOWED
        assert plain.get("/").status_code == 401  # the page itself needs the token (test_serve_security.py)
        page = plain.get("/", params={"token": TOKEN}, follow_redirects=True)
        assert page.status_code == 200 and '<meta name="threedis-tiny" content="1">' in page.text
        assert TOKEN not in page.text
        assert plain.get("/docs").status_code == 200 and "/api/v1/jobs" in plain.get("/openapi.json").text
        docs = plain.get("/docs").text  # the OpenAPI page works offline: its scripts are served locally
        assert "http://" not in docs and "https://" not in docs and "/docs-static/swagger-ui-bundle.js" in docs
        assert plain.get("/docs-static/swagger-ui-bundle.js").status_code == 200
    finally:
        plain.close()
    from websockets.exceptions import InvalidStatus

    for token, origin in (("wrong", None), (TOKEN, "http://evil.example")):
        with pytest.raises((InvalidStatus, ConnectionError, OSError)):
            log = EventLog(url, token, origin=origin)
            log.wait_for(lambda e: e["type"] == "snapshot", timeout=10)
    _healthy(client)


def test_token_file_is_private_and_no_auth_off_loopback_is_refused(tmp_path):
    from threedis import UserError
    from threedis.engine.serve.security import check_bind, load_or_create_token, token_path

    token = load_or_create_token(tmp_path)
    assert len(token) >= 32 and token_path(tmp_path).stat().st_mode & 0o777 == 0o600
    assert load_or_create_token(tmp_path) == token  # made once per install
    with pytest.raises(UserError, match="--no-auth"):
        check_bind("0.0.0.0", None)
    check_bind("127.0.0.1", None)
    check_bind("0.0.0.0", token)


# ---------------------------------------------------------------------------- restart and the client


def test_restart_brings_back_queued_jobs_as_interrupted_and_keeps_files(tmp_path):
    from threedis.client import Client, ClientError

    config = _config(tmp_path / "out")
    with running_service(config) as (url, _):
        client = Client(url, TOKEN)
        depth = tmp_path / "depth.png"
        depth.write_bytes(png_bytes())
        upload = client.upload(depth, "depth")
        source = {"source": "upload", "upload": upload}
        finished = client.submit(layout_dict(), steps=1, depth=source)
        progress = []
        final = client.wait(finished, on_progress=progress.append, timeout=120)
        assert final["status"] == "done" and progress[-1]["status"] == "done"
        saved = client.download(finished, "image.png", tmp_path / "got" / "image.png")
        with Image.open(saved) as image:
            assert json.loads(image.text["threedis"])["layout"]["prompt"] == layout_dict()["prompt"]
        saved_bytes = saved.read_bytes()
        with pytest.raises(ClientError, match="exists; pass overwrite=True"):  # never overwritten by surprise
            client.download(finished, "report.json", saved)
        assert saved.read_bytes() == saved_bytes and list(saved.parent.iterdir()) == [saved]
        assert client.download(finished, "image.png", saved, overwrite=True) == saved
        running = client.submit(layout_dict(), steps=LONG, depth=source)
        queued = [client.submit(layout_dict(), steps=1, depth=source, seed=i) for i in range(2)]
        events = EventLog(url, TOKEN)
        events.wait_for(lambda e: e.get("job") == running and e["type"] == "step")
        events.close()
        with pytest.raises(ClientError) as err:
            client.submit({"prompt": "", "width": 64, "height": 64})
        assert err.value.status == 422 and err.value.problems[0]["field"] == "prompt"
        assert client.system()["queue_length"] == 2
    with running_service(_config(tmp_path / "out")) as (url, _):  # the same folder, a new service
        client = Client(url, TOKEN)
        for job_id in (running, *queued):
            job = client.status(job_id)
            assert job["status"] == "interrupted" and "resubmit" in job["error"]
        assert client.status(finished)["status"] == "done"
        again = client.download(finished, "image.png", tmp_path / "again.png")
        assert again.read_bytes() == saved.read_bytes()

        def no_hard_links(src, dst):
            raise OSError(errno.EPERM, "Operation not permitted")  # exFAT, some network shares

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(os, "link", no_hard_links)
            linkless = client.download(finished, "image.png", tmp_path / "linkless.png")
            assert linkless.read_bytes() == saved.read_bytes()
            with pytest.raises(ClientError, match="exists; pass overwrite=True"):
                client.download(finished, "image.png", linkless)
        with pytest.raises(ClientError, match="cannot write"):  # a file where the folder should be
            client.download(finished, "image.png", again / "inside.png")
        new = client.resubmit(queued[0])
        assert client.wait(new, timeout=120)["status"] == "done"
        assert client.status(new)["resubmitted_from"] == queued[0]
        with pytest.raises(ClientError) as err:
            Client(url, "wrong").system()
        assert err.value.status == 401


# ---------------------------------------------------------------------------- the command


def test_serve_command_without_the_extra_says_how_to_install(monkeypatch, capsys):
    import sys

    from threedis.engine import cli

    monkeypatch.setitem(sys.modules, "fastapi", None)  # as if the serve extra were not installed
    assert cli.main(["serve"]) == 2
    assert capsys.readouterr().err.strip() == (
        'threedis: error: threedis serve needs FastAPI and uvicorn: pip install "threedis-flux[serve]"')


@pytest.mark.parametrize("argv, words", [
    (["--no-auth", "--host", "0.0.0.0"], "--no-auth with --host 0.0.0.0"),
    (["--max-upload-mb", "0"], "--max-upload-mb must be a positive number"),
    (["--port", "70000"], "--port must be 1..65535"),
])
def test_serve_command_refuses_bad_settings_in_one_line(argv, words, tmp_path, capsys):
    from threedis.engine import cli

    assert cli.main(["serve", "--out", str(tmp_path), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("threedis: error: ") and words in err and "\n" not in err


def test_the_client_needs_only_the_standard_library():
    import subprocess
    import sys

    code = ("import sys, threedis.client; "
            "heavy = [m for m in ('torch', 'fastapi', 'httpx', 'PIL', 'numpy') if m in sys.modules]; "
            "print(heavy); sys.exit(1 if heavy else 0)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_plan_prices_the_models_the_service_loads_and_takes_only_built_in_profiles(service, tmp_path, capsys):
    from threedis.engine import cli
    from threedis.engine.loading import SUBFOLDERS
    from threedis.engine.planner import plan
    from threedis.engine.profiles import load_profile
    from threedis.engine.serve.engines import tiny_checkpoints

    _, client, _, _, _ = service
    layout = {**layout_dict(), "width": 1024, "height": 768}
    answer = client.post("/api/v1/plan", json={"layout": layout, "profile": "12gb", "stage1": True, "sam": True})
    assert answer.status_code == 200, answer.text
    # The service runs the tiny checkpoints: priced from their own config files, as loaded.
    paths = {name: Path(folder) for name, folder in tiny_checkpoints().items()}
    models = {key: paths["model"] / sub for key, sub in SUBFOLDERS.items()}
    models.update({f"ldm3d_{key}": paths["stage1"] / sub / "config.json"
                   for key, sub in (("unet", "unet"), ("vae", "vae"), ("text", "text_encoder"))})
    models["sam2"] = paths["sam"] / "config.json"
    from threedis.engine.tiny_rules import STAGE1_SIZE

    tiny_stage1 = (STAGE1_SIZE, STAGE1_SIZE)  # stage 1 at the size the service's jobs get (tiny: 64), not 512
    expected = plan(load_profile("12gb"), 1024, 768, 2, models=models, stage1_size=tiny_stage1).to_dict()
    got = answer.json()
    assert got["stages"] == expected["stages"] and got["profile"] == "12gb" and got["stage1_size"] == list(tiny_stage1)
    assert got["peak_host_bytes"] < 2 * 1024**3, got["peak_host_bytes"]  # the tiny models, not FLUX's 12B
    sized = client.post("/api/v1/plan", json={"layout": layout, "profile": "12gb", "stage1": True, "stage1_size": 512})
    assert sized.json()["stage1_size"] == [512, 512]  # a size the request names wins
    # Activations too are the tiny models': a tiny 512^2 render grows the process by ~0.16 GB (its report's
    # RSS, 0.57 -> 0.73 GB); priced with the real VAE's 1100 values per pixel the plan said 1.15 GB.
    on_cpu = client.post("/api/v1/plan", json={"layout": {**layout, "width": 512, "height": 512}, "profile": "cpu",
                                                "stage1": True}).json()
    assert on_cpu["peak_host_bytes"] < 0.3e9, on_cpu["peak_host_bytes"]
    photo = client.post("/api/v1/plan", json={"layout": layout, "profile": "12gb", "photo": True}).json()
    assert "depth_estimate" in [row["stage"] for row in photo["stages"]]  # a photo's depth is priced when asked
    path = tmp_path / "layout.json"
    path.write_text(json.dumps(layout))
    assert cli.main(["plan", str(path), "--profile", "12gb", "--stage1", "--sam", "--json"]) == 0
    real = json.loads(capsys.readouterr().out)  # what the real FLUX.1-Depth-dev would take
    assert real["peak_host_bytes"] > 10 * got["peak_host_bytes"]
    toml = tmp_path / "mine.toml"
    toml.write_text('name = "mine"\n')
    refused = client.post("/api/v1/plan", json={"layout": layout, "profile": str(toml)})
    assert refused.status_code == 422 and refused.json()["detail"]["problems"][0]["field"] == "profile"
    assert client.post("/api/v1/plan", json={"layout": {**layout, "width": 1000}}).status_code == 422
    empty = {**layout, "prompt": "", "instances": [{"prompt": "", "box": [0.1, 0.1, 0.5, 0.5]}]}
    unwritten = client.post("/api/v1/plan", json={"layout": empty, "profile": "12gb"})  # a plan reads no prompt
    assert unwritten.status_code == 200 and unwritten.json()["num_instances"] == 1


def test_two_services_in_one_process_do_not_share_jobs_events_or_uploads(tmp_path):
    first, second = _config(tmp_path / "a"), _config(tmp_path / "b", token="another-token")
    with running_service(first) as (url_a, _), running_service(second) as (url_b, _):
        a = httpx.Client(base_url=url_a, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60)
        b = httpx.Client(base_url=url_b, headers={"Authorization": "Bearer another-token"}, timeout=60)
        watch_b = EventLog(url_b, "another-token")
        try:
            watch_b.wait_for(lambda e: e["type"] == "snapshot")
            assert a.get("/api/v1/system").status_code == 200
            assert b.get("/api/v1/system", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 401
            upload = _upload(a, png_bytes()).json()["id"]
            job = wait_final(a, a.post("/api/v1/jobs", json=_job(upload, size=32)).json()["id"])
            assert job["status"] == "done"
            assert b.get("/api/v1/jobs").json()["jobs"] == []
            assert b.get(f"/api/v1/uploads/{upload}").status_code == 404
            assert [e["type"] for e in watch_b.events] == ["snapshot"]
            assert not (tmp_path / "b" / "jobs").exists() or not any((tmp_path / "b" / "jobs").iterdir())
        finally:
            watch_b.close()
            a.close()
            b.close()


def test_the_service_answers_while_the_models_load(tmp_path):
    import threading

    from threedis.engine.serve.engines import default_factory

    config = _config(tmp_path / "out")
    release = threading.Event()
    build = default_factory(config)

    def slow_build():
        assert release.wait(120), "the test never let the engine load"
        return build()

    with running_service(config, ready=False, engine_factory=slow_build) as (url, app):
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60) as client:
            system = client.get("/api/v1/system").json()
            assert system["state"] == "loading" and system["error"] is None and system["models_loaded"] == []
            assert client.get("/", params={"token": TOKEN}, follow_redirects=True).status_code == 200
            waiting = client.post("/api/v1/plan", json={"layout": layout_dict()})
            assert waiting.status_code == 503 and "loading" in waiting.json()["detail"]["message"]
            depth = client.post("/api/v1/uploads", files={"file": ("d.png", png_bytes(), "image/png")},
                                data={"kind": "depth"}).json()["id"]
            queued = client.post("/api/v1/jobs", json=_job(depth, size=32))  # jobs queue while it loads
            assert queued.status_code == 202 and client.get(f"/api/v1/jobs/{queued.json()['id']}").json()[
                "status"] == "queued"
            events = EventLog(url, TOKEN)
            try:
                events.wait_for(lambda e: e["type"] == "snapshot")
                release.set()
                assert events.wait_for(lambda e: e["type"] == "system")["state"] == "ready"
            finally:
                events.close()
            assert wait_final(client, queued.json()["id"])["status"] == "done"
            assert client.get("/api/v1/system").json()["state"] == "ready"
