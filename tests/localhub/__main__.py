"""``python3 tests/localhub serve ...`` (started by LocalHub) and ``python3 tests/localhub up DIR`` (serve the three
repositories until Ctrl-C, for poking with curl)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a folder: tests/ holds the package

from localhub.front import serve  # noqa: E402
from localhub.repos import build_all  # noqa: E402
from localhub.server import LocalHub  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("serve", help="run the front server (LocalHub starts it)")
    p.add_argument("--mirrors", type=Path, required=True)
    p.add_argument("--olah-port", type=int, required=True)
    p.add_argument("--port-file", type=Path, required=True)
    p.add_argument("--parent-pid", type=int)
    p.add_argument("--olah-pid", type=int)
    p = sub.add_parser("up", help="build the three repositories in DIR and serve them until Ctrl-C")
    p.add_argument("dir", type=Path)
    p.add_argument("--n-images", type=int, default=300)
    args = parser.parse_args(argv)
    if args.command == "serve":
        serve(args.mirrors, args.olah_port, args.port_file, args.parent_pid, args.olah_pid)
    else:
        with LocalHub(args.dir) as hub:
            if not any(hub.mirrors.iterdir()):
                print(json.dumps(build_all(hub, args.n_images), indent=1))
            print(f"HF_ENDPOINT={hub.endpoint}  (logs in {hub.logs}; Ctrl-C stops)", flush=True)
            try:
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt:
                pass


if __name__ == "__main__":
    main()
