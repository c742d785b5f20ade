"""Photos kept in S3 as a data version: `vflow data add s3://...` (`data.s3_sync`: a mirror,
then `dvc add`) beside DVC's own `dvc import-url` and a plain parallel download.

A real S3 server (`rclone serve s3`, the stack's object store) serves `--photos` generated
~500x375 JPEGs in 10 classes (`bench_scale.make_photos`, about 80 kB each). Round by round,
alternating, each into a fresh git+DVC project: `vflow data add`, `dvc import-url`, and a
plain download of every object with boto3 on 16 threads (no versioning). After the last
round: 1% new objects put through the S3 API, then what a retrain's refresh runs in each
project (`vflow data add` again: the sync; `dvc update data.dvc`), then both again with
nothing new; the mirror's version is pushed to a DVC remote on the same server, whole first,
then after each refresh (what a scheduled refresh adds: only the new files go). Wall seconds
(medians) and each command's peak RSS (`/usr/bin/time`, the largest process of its tree).

    .venv/bin/python bench/bench_s3_import.py --photos 10000 --rounds 2
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_scale import make_photos  # noqa: E402

VENV = Path(sys.executable).parent
WORK = Path("/tmp/bench_s3_import")
KEYS = ("benchkey", "benchsecret")


def serve(root: Path) -> tuple[subprocess.Popen, dict[str, str]]:
    from visionflow.orchestration.servers import free_port
    from visionflow.stack import objectstore

    port = free_port()
    proc = subprocess.Popen(objectstore.command(root, "127.0.0.1", port),
                            env={**os.environ, **objectstore.server_env(*KEYS)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env = {"AWS_ENDPOINT_URL": objectstore.endpoint("127.0.0.1", port),
           "AWS_ACCESS_KEY_ID": KEYS[0], "AWS_SECRET_ACCESS_KEY": KEYS[1],
           **objectstore.CLIENT_ENV, "DVC_NO_ANALYTICS": "1"}
    s3 = objectstore.client(env["AWS_ENDPOINT_URL"], *KEYS)
    for _ in range(100):
        try:
            s3.list_buckets()
            return proc, env
        except Exception:  # noqa: BLE001 (not up yet)
            time.sleep(0.1)
    raise SystemExit("rclone serve s3 did not answer")


def timed(cmd: list[str], cwd: Path, env: dict[str, str]) -> tuple[float, int]:
    """Wall seconds and peak RSS (MB) of `cmd` (GNU time's %M: the largest process)."""
    t = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-f", "%M", *cmd], cwd=cwd, capture_output=True,
                          text=True, env={**os.environ, **env})
    wall = time.perf_counter() - t
    if proc.returncode:
        raise SystemExit(f"{cmd} failed: {proc.stderr[-2000:]}")
    return wall, int(proc.stderr.strip().splitlines()[-1]) // 1024


def project(root: Path) -> Path:
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    for cmd in (["git", "init", "-q"], [str(VENV / "dvc"), "init", "-q"],
                [str(VENV / "dvc"), "config", "core.autostage", "true"]):
        subprocess.run(cmd, cwd=root, check=True)
    return root


def download_all(env: dict[str, str], dest: Path, threads: int = 16) -> float:
    """Every object under photos/set into `dest`, boto3 on `threads` threads."""
    from visionflow.stack import objectstore

    shutil.rmtree(dest, ignore_errors=True)
    s3 = objectstore.client(env["AWS_ENDPOINT_URL"], *KEYS)
    t = time.perf_counter()
    keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(
        Bucket="photos", Prefix="set/") for o in page.get("Contents", [])]

    def get(key: str) -> None:
        path = dest / key.removeprefix("set/")
        path.parent.mkdir(parents=True, exist_ok=True)
        s3.download_file("photos", key, str(path))

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(get, keys))
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--photos", type=int, default=10_000)
    ap.add_argument("--rounds", type=int, default=2)
    a = ap.parse_args()
    photos = make_photos(a.photos)
    bucket = WORK / "s3" / "photos" / "set"
    ready = WORK / "bucket-holds"  # how many photos the bucket holds
    if not ready.is_file() or ready.read_text() != str(a.photos):
        ready.unlink(missing_ok=True)
        shutil.rmtree(bucket, ignore_errors=True)
        shutil.copytree(photos / "train", bucket, copy_function=os.link)
        ready.write_text(str(a.photos))
    size = sum(p.stat().st_size for p in bucket.rglob("*.jpg"))
    server, env = serve(WORK / "s3")
    out: dict = {"photos": a.photos, "bytes": size}
    vflow, dvc = str(VENV / "vflow"), str(VENV / "dvc")
    ways = {"vflow_data_add": lambda: [vflow, "data", "add", "s3://photos/set"],
            "dvc_import_url": lambda: [dvc, "import-url", "s3://photos/set", "data"]}
    projects: dict[str, Path] = {}
    try:
        for r in range(a.rounds):
            for name, cmd in ways.items():
                projects[name] = project(WORK / name)
                wall, rss = timed(cmd(), projects[name], env)
                out.setdefault(f"{name}_s", []).append(round(wall, 2))
                out.setdefault(f"{name}_rss_mb", []).append(rss)
            out.setdefault("plain_download_s", []).append(
                round(download_all(env, WORK / "plain"), 2))
            print(f"round {r}: " + ", ".join(f"{k} {v[-1]}" for k, v in out.items()
                                             if isinstance(v, list)), flush=True)
        from visionflow.stack import objectstore

        s3 = objectstore.client(env["AWS_ENDPOINT_URL"], *KEYS)
        mirror = projects["vflow_data_add"]  # its version pushed to a DVC remote on S3
        s3.create_bucket(Bucket="dvc")
        for cmd in (["remote", "add", "-d", "s3", "s3://dvc/store"],
                    ["remote", "modify", "s3", "endpointurl", env["AWS_ENDPOINT_URL"]]):
            subprocess.run([dvc, *cmd], cwd=mirror, check=True)
        wall, rss = timed([dvc, "push", "-q", "data.dvc"], mirror, env)
        out["dvc_push_whole_s"], out["dvc_push_whole_rss_mb"] = round(wall, 2), rss
        jpgs = sorted(bucket.rglob("*.jpg"))[: a.photos // 100]
        for p in jpgs:  # 1% new photos, through the S3 API
            s3.put_object(Bucket="photos", Key=f"set/{p.parent.name}/new-{p.name}",
                          Body=p.read_bytes())
        refresh = {"vflow_data_add": ways["vflow_data_add"](),
                   "dvc_import_url": [dvc, "update", "data.dvc"]}
        for when in ("1pct_new", "unchanged"):
            for name, cmd in refresh.items():
                wall, rss = timed(cmd, projects[name], env)
                out[f"{name}_refresh_{when}_s"] = round(wall, 2)
                out[f"{name}_refresh_{when}_rss_mb"] = rss
            # what a scheduled refresh adds to a new version: `dvc push` (only what is new)
            wall, rss = timed([dvc, "push", "-q", "data.dvc"], mirror, env)
            out[f"dvc_push_{when}_s"], out[f"dvc_push_{when}_rss_mb"] = round(wall, 2), rss
        for p in jpgs:
            s3.delete_object(Bucket="photos", Key=f"set/{p.parent.name}/new-{p.name}")
    finally:
        server.terminate()
        server.wait(10)
    for key in [k for k, v in out.items() if isinstance(v, list) and k.endswith("_s")]:
        out[key.removesuffix("_s") + "_median_s"] = statistics.median(out[key])
    med = {k: out[f"{k}_median_s"] for k in (*ways, "plain_download")}
    out["import_ratio_dvc_over_vflow"] = round(med["dvc_import_url"] / med["vflow_data_add"], 2)
    out["import_ratio_plain_over_vflow"] = round(med["plain_download"] / med["vflow_data_add"],
                                                 2)
    out["refresh_ratio_dvc_over_vflow"] = round(out["dvc_import_url_refresh_1pct_new_s"]
                                                / out["vflow_data_add_refresh_1pct_new_s"], 2)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
