"""End to end as a user sees it: `dagster dev` (webserver + daemon) with a real instance. The
sensor is on by default, picks up the shards without any click, and the daemon runs the shard
pipeline over them, several shards per run."""

from __future__ import annotations

import html
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import dagster as dg
import pytest
import requests

REPO = Path(__file__).resolve().parents[1]
LOCATION = "curator_assets"

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def gql(url: str, query: str, variables: dict | None = None) -> dict:
    r = requests.post(url, json={"query": query, "variables": variables or {}}, timeout=30)
    r.raise_for_status()
    body = r.json()
    assert "errors" not in body, body
    return body["data"]


RUNS = """{ runsOrError { ... on Runs { results { runId jobName status tags { key value } } } } }"""
LATEST = """query($path: [String!]!) { assetOrError(assetKey: {path: $path}) {
  ... on Asset { assetMaterializations(limit: 1) { runId metadataEntries { label } } } } }"""
SENSOR = """query($sel: SensorSelector!) { sensorOrError(sensorSelector: $sel) {
  __typename ... on Sensor { sensorState { status } } ... on PythonError { message } } }"""
ASSETS = """{ assetNodes { assetKey { path } groupName kinds } }"""


@pytest.fixture
def automation() -> str:
    return "on"


@pytest.fixture
def dagster_dev(tmp_path: Path, make_shard, automation: str):
    make_shard("00000.tar", n=4)
    make_shard("00002.tar", n=2)
    make_shard("00003.tar", n=2)
    make_shard("part-a/00001.tar", n=3)
    home = tmp_path / "home"
    home.mkdir()
    (home / "dagster.yaml").write_text((REPO / "dagster.yaml").read_text())
    port = free_port()
    env = {**os.environ, "DAGSTER_HOME": str(home), "CURATOR_DATASET_URL": str(tmp_path / "dataset"),
           "CURATOR_SENSOR_INTERVAL": "1", "DAGSTER_DISABLE_TELEMETRY": "1", "CURATOR_AUTOMATION": automation}
    log = open(tmp_path / "dagster-dev.log", "wb")
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "dagster"), "dev", "-w", str(REPO / "workspace.yaml"),
         "-h", "127.0.0.1", "-p", str(port)],
        cwd=home, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}/graphql"
    deadline = time.time() + 180
    while time.time() < deadline:
        try:
            if requests.get(f"http://127.0.0.1:{port}/server_info", timeout=2).ok:
                break
        except requests.RequestException:
            pass
        if proc.poll() is not None:
            raise AssertionError("dagster dev exited:\n" + (tmp_path / "dagster-dev.log").read_text()[-3000:])
        time.sleep(1)
    else:
        raise AssertionError("dagster dev did not answer in 180 s")
    try:
        yield url, tmp_path
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


def wait_for_removal(home: Path, key: str, timeout: float = 120) -> None:
    """Until the sensor has deleted the partition ``key`` and recorded its removal."""
    import dagster as dg

    with pytest.MonkeyPatch.context() as env:
        env.setenv("DAGSTER_HOME", str(home))  # the shipped pooled storage keeps its files there
        with dg.DagsterInstance.from_config(str(home)) as instance:
            deadline = time.time() + timeout
            while key in instance.get_dynamic_partitions("shards"):
                assert time.time() < deadline, f"partition {key} not deleted in {timeout:.0f} s"
                time.sleep(0.5)
            records = instance.fetch_observations(
                dg.AssetRecordsFilter(asset_key=dg.AssetKey("decoded_images"), asset_partitions=[key]),
                limit=5).records
    removed = [r.asset_observation.metadata.get("removed") for r in records]
    assert dg.MetadataValue.bool(True) in removed, records


def failures(home: Path) -> str:
    """The step failures recorded in the instance, for a readable assertion message."""
    import dagster as dg

    with dg.DagsterInstance.from_ref(dg.InstanceRef.from_dir(str(home))) as instance:
        out = []
        for run in instance.get_runs():
            for event in instance.all_logs(run.run_id):
                if event.dagster_event and event.dagster_event.is_step_failure:
                    err = event.dagster_event.step_failure_data.error
                    out.append(f"{run.tags.get('dagster/partition')}: {event.step_key}: {err.message if err else ''}")
        return "\n".join(out)


def test_sensor_picks_up_shards_and_daemon_runs_them(dagster_dev, make_shard) -> None:
    import pyarrow.parquet as pq
    from PIL import Image

    url, tmp_path = dagster_dev
    nodes = {"/".join(n["assetKey"]["path"]): n for n in gql(url, ASSETS)["assetNodes"]}
    assert "shard_index" in nodes and nodes["shard_index"]["groupName"] == "shards"

    sel = {"repositoryLocationName": LOCATION, "repositoryName": "__repository__", "sensorName": "shard_sensor"}
    sensor = gql(url, SENSOR, {"sel": sel})["sensorOrError"]
    assert sensor["__typename"] == "Sensor", sensor
    assert sensor["sensorState"]["status"] == "RUNNING"  # on by default: nothing to click
    # Started in the folder of its dagster.yaml (DAGSTER_HOME), as the repo's is started in the repo
    # root: no warning about an instance file beside it that would be ignored.
    assert "Found a dagster instance configuration" not in (tmp_path / "dagster-dev.log").read_text()

    deadline = time.time() + 240
    runs: list[dict] = []
    while time.time() < deadline:
        runs = [r for r in gql(url, RUNS)["runsOrError"]["results"] if r["jobName"] == "shard_pipeline"]
        done = [r for r in runs if r["status"] in ("SUCCESS", "FAILURE", "CANCELED")]
        if runs and len(done) == len(runs):
            break
        time.sleep(2)
    # Four new shards, one `gpu` slot on this CPU-only machine (the shipped dagster.yaml): one
    # run over the four, in the partitions' order.
    ranges = sorted((tags.get("dagster/asset_partition_range_start"), tags.get("dagster/asset_partition_range_end"))
                    for r in runs for tags in [{t["key"]: t["value"] for t in r["tags"]}])
    assert ranges == [("00000", "part-a/00001")], runs
    assert all(r["status"] == "SUCCESS" for r in runs), failures(tmp_path / "home")
    for key in ("00000", "00002", "00003", "part-a/00001"):
        assert (tmp_path / "dataset" / f"{key}.idx").exists()
        assert (tmp_path / "dataset" / "_curator" / "manifests" / f"{key}.parquet").exists()

    # The dataset summaries follow on their own (their automation condition sensor is on too).
    deadline = time.time() + 180
    latest: list = []
    while time.time() < deadline:
        latest = gql(url, LATEST, {"path": ["dataset_decode_summary"]})["assetOrError"]["assetMaterializations"]
        if latest:
            break
        time.sleep(2)
    assert latest, "dataset_decode_summary was not materialized without a click"
    assert {"image_sizes", "duplicate_images", "records"} <= {e["label"] for e in latest[0]["metadataEntries"]}

    # A shard deleted and uploaded again with other bytes is processed again. The sensor must see
    # a delete, not a change: the partition goes (a changed shard keeps it) and the removal is
    # recorded; only then does the shard come back.
    shard = tmp_path / "dataset" / "00002.tar"
    shard.unlink()
    wait_for_removal(tmp_path / "home", "00002")
    make_shard("00002.tar", n=3)
    deadline = time.time() + 240
    rerun: list[dict] = []
    while time.time() < deadline:
        rerun = [r for r in gql(url, RUNS)["runsOrError"]["results"] if r["jobName"] == "shard_pipeline"
                 and {"key": "dagster/partition", "value": "00002"} in r["tags"]]
        if rerun and rerun[0]["status"] in ("SUCCESS", "FAILURE", "CANCELED"):
            break
        time.sleep(2)
    assert rerun and rerun[0]["status"] == "SUCCESS", (rerun, failures(tmp_path / "home"))
    manifest = pq.read_table(tmp_path / "dataset" / "_curator" / "manifests" / "00002.parquet")
    assert manifest.num_rows == 3  # the new bytes, not the old two records

    # What a user sees: the pages rendered by headless Chromium.
    base = url.removesuffix("/graphql")
    text = rendered_text(base + "/assets/decoded_images?view=partitions&partition=00002", tmp_path)
    for expected in ("00000", "00003", "part-a/00001", "Materialized (4)", "decoded", "manifest_path",
                     "width x height x channels"):
        assert expected in text, (expected, text[:2000])
    summary = rendered_text(base + "/assets/dataset_decode_summary", tmp_path)
    for expected in ("duplicate_images", "records", "images_per_s"):
        assert expected in summary, (expected, summary[:2000])
    assert gql(url, "mutation { setNuxSeen }")["setNuxSeen"]  # the first visit's dialog, skipped as a user would
    shot = screenshot(base + "/assets/decoded_images?view=partitions&partition=00000", tmp_path)
    with Image.open(shot) as im:
        colours = im.convert("RGB").getcolors(maxcolors=1 << 16)
    assert colours is None or len(colours) > 50, "the screenshot is blank"
    if os.environ.get(DOCS_PICTURES):
        save_docs_pictures(shot, tmp_path / "home", Path(os.environ[DOCS_PICTURES]))


# scripts/docs-pictures.sh sets it: the README's pictures are the ones this test takes.
DOCS_PICTURES = "CURATOR_DOCS_PICTURES"


def save_docs_pictures(shot: Path, home: Path, folder: Path) -> None:
    """The screenshot, and the contact sheet of shard 00000 as its materialization holds it."""
    import base64

    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(shot, folder / "dagster-ui.png")
    before = os.environ.get("DAGSTER_HOME")
    os.environ["DAGSTER_HOME"] = str(home)  # the instance's storage lives in its home
    try:
        with dg.DagsterInstance.get() as instance:
            records = instance.fetch_materializations(dg.AssetRecordsFilter(
                asset_key=dg.AssetKey("decoded_images"), asset_partitions=["00000"]), limit=1).records
    finally:
        os.environ.pop("DAGSTER_HOME") if before is None else os.environ.update(DAGSTER_HOME=before)
    sheet = records[0].asset_materialization.metadata["contact_sheet"].value
    png = base64.b64decode(re.search(r"base64,([A-Za-z0-9+/=]+)", sheet).group(1))
    (folder / "contact-sheet.png").write_bytes(png)


CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def chromium(tmp_path: Path) -> list[str]:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:  # part of the test set-up, like the emulators: never skipped
        pytest.fail("chromium is missing: apt-get install -y chromium (scripts/test.sh installs it)")
    return [exe, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'chromium-profile'}", "--virtual-time-budget=20000"]


def rendered_text(page: str, tmp_path: Path) -> str:
    """The page's text after the UI's scripts ran (the DOM Chromium rendered, tags stripped)."""
    dom = subprocess.run([*chromium(tmp_path), "--dump-dom", page], capture_output=True, text=True,
                         timeout=120).stdout
    dom = re.sub(r"<script.*?</script>|<style.*?</style>", " ", dom, flags=re.S)
    return html.unescape(re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", dom)))


def screenshot(page: str, tmp_path: Path) -> Path:
    out = tmp_path / "partitions.png"  # kept under the test's temp folder
    subprocess.run([*chromium(tmp_path), "--window-size=1400,1000", f"--screenshot={out}", page],
                   capture_output=True, timeout=120)
    assert out.exists() and out.stat().st_size > 0
    return out


BACKFILL = """mutation($params: LaunchBackfillParams!) { launchPartitionBackfill(backfillParams: $params) {
  __typename ... on LaunchBackfillSuccess { backfillId } ... on PythonError { message } } }"""
BACKFILL_STATUS = """query($id: String!) { partitionBackfillOrError(backfillId: $id) {
  __typename ... on PartitionBackfill { status } ... on PythonError { message } } }"""
ADD_PARTITION = """mutation($sel: RepositorySelector!, $key: String!) {
  addDynamicPartition(repositorySelector: $sel, partitionsDefName: "shards", partitionKey: $key) {
    __typename ... on PythonError { message } } }"""


@pytest.mark.parametrize("automation", ["off"])  # the sensor would run the shards before the backfill
def test_a_backfill_over_every_shard_indexes_validates_and_decodes(dagster_dev) -> None:
    """What a user does from the UI: add the shards, backfill the per-shard assets over all
    partitions, and read the manifests afterwards."""
    import pyarrow.parquet as pq

    url, tmp_path = dagster_dev
    repo = {"repositoryLocationName": LOCATION, "repositoryName": "__repository__"}
    for key in ("00000", "00002", "00003", "part-a/00001"):
        added = gql(url, ADD_PARTITION, {"sel": repo, "key": key})["addDynamicPartition"]
        assert added["__typename"] == "AddDynamicPartitionSuccess", added
    params = {
        "assetSelection": [{"path": [name]} for name in ("shard_index", "shard_validation", "decoded_images")],
        "allPartitions": True,
        "title": "all shards",
    }
    launched = gql(url, BACKFILL, {"params": params})["launchPartitionBackfill"]
    assert launched["__typename"] == "LaunchBackfillSuccess", launched
    deadline = time.time() + 300
    status = None
    while time.time() < deadline:
        status = gql(url, BACKFILL_STATUS, {"id": launched["backfillId"]})["partitionBackfillOrError"]["status"]
        if status not in ("REQUESTED", "CANCELING", "FAILING"):
            break
        time.sleep(2)
    assert status == "COMPLETED_SUCCESS", (status, failures(tmp_path / "home"))
    runs = gql(url, RUNS)["runsOrError"]["results"]
    assert len(runs) == 1, runs  # the backfill policy puts the four shards in one run
    dataset = tmp_path / "dataset"
    for key in ("00000", "00002", "00003", "part-a/00001"):
        shard = dataset / f"{key}.tar"
        manifest = pq.read_table(dataset / "_curator" / "manifests" / f"{key}.parquet").to_pandas()
        with tarfile.open(shard) as tar:
            keys = sorted({m.name.split(".")[0] for m in tar.getmembers()})
        assert sorted(manifest["record_id"]) == keys
        assert manifest["decoded"].all()
