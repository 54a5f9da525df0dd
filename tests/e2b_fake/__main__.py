"""The fake E2B in a process of its own, as a remote E2B would be to its clients:

    python -m tests.e2b_fake --api-key KEY

prints its URL on the first line of stdout and serves until SIGTERM/SIGINT."""

import argparse
import signal
import sys
import threading

from tests.e2b_fake import FakeE2B


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--api-key", required=True)
    args = parser.parse_args()
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    with FakeE2B(api_key=args.api_key) as fake:
        print(fake.url, flush=True)
        done.wait()
    sys.stdout.close()


if __name__ == "__main__":
    main()
