"""``python -m labelgw <command>``: helper commands next to ``twistd labelgw`` (which runs the gateway)."""

from __future__ import annotations

import sys
from collections.abc import Sequence

USAGE = """\
usage: python -m labelgw <command> [options]

commands:
  ca       show labelgw's local certificate authority; --install / --uninstall it in the system trust store
  explain  where a running labelgw would send a request to URL now (asks its admin listener; --help)
  register register an instance with the registration API, heartbeat, deregister on SIGTERM/SIGINT (--help)
  reload   make a running labelgw reload (SIGHUP through its pidfile): config re-read, workers replaced (--help)

The gateway itself runs under twistd: twistd -n labelgw --help"""


def main(argv: Sequence[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "ca":
        from labelgw.cli.ca_command import main as ca_main  # noqa: PLC0415 - only the chosen command is imported

        return ca_main(rest)
    if command == "explain":
        from labelgw.cli.explain_command import main as explain_main  # noqa: PLC0415 - only the chosen command

        return explain_main(rest)
    if command == "register":
        from labelgw.registration.client import main as register_main  # noqa: PLC0415 - only the chosen command

        return register_main(rest)
    if command == "reload":
        from labelgw.cli.reload_command import main as reload_main  # noqa: PLC0415 - only the chosen command

        return reload_main(rest)
    print(f"python -m labelgw: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
