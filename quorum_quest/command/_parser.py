"""The command line of `quorum-quest`: its subcommands, flags and help."""

from __future__ import annotations

import argparse
import os
import sys
from typing import NoReturn

from quorum_quest.command._connect import DEFAULT_ADDRESS
from quorum_quest.command._exit import EXIT_CODES_HELP, Exit

DESCRIPTION = """\
Use a Quorum Quest service from the shell: run a command while holding a lock,
campaign for leadership, ask or watch who leads, and check the service."""

EXAMPLES = """\
examples:
  quorum-quest lock billing nightly-report -- ./make-report.sh
  quorum-quest lock --ttl 30 --wait 60 billing eu-west -- sh -c 'run --token "$QQ_FENCING_TOKEN"'
  quorum-quest elect billing eu-west --value "$(hostname)"
  quorum-quest leader billing eu-west --json
  quorum-quest watch billing
  quorum-quest --address qq.internal:5050 --tls --token-file /run/secrets/qq status
"""

LOCK_HELP = """\
Wait for the lock, then run COMMAND while holding it. The lease is kept alive
while the command runs; the command's environment has QQ_FENCING_TOKEN,
QQ_LEASE_TTL (seconds), QQ_SERVICE, QQ_DOMAIN and QQ_CLIENT_ID. If the lease is
lost, the command gets SIGTERM at once and SIGKILL after --kill-grace seconds,
and quorum-quest exits 121. SIGINT, SIGTERM and SIGHUP are passed on to the
command. When the command exits the lock is released and quorum-quest exits
with the command's status (128+N if signal N ended it)."""

ELECT_HELP = """\
Campaign for leadership of a lock. When elected, print one line, the leader's
value (its client id) and fencing token, then hold the lock until interrupted
(SIGINT, SIGTERM or SIGHUP: release and exit 0). Exits 121 if the lease is lost."""

LEADER_HELP = """\
Print who holds a lock: its client id, fencing token and the lease it has left,
or "no leader" (exit status 120)."""

WATCH_HELP = """\
Print one line per leadership change of a lock, or of every lock of SERVICE when
no DOMAIN is given: first the current state, then each grant, release, expiry
and loss, until interrupted. A line marked as a gap means changes may have been
missed in between (it then gives the lock's whole state)."""

STATUS_HELP = "Print the service's status: version, store, uptime, leases held, reloads."


class Parser(argparse.ArgumentParser):
    """An argparse parser whose usage errors exit 125, away from commands' statuses."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(Exit.USAGE, f"quorum-quest: {message}\n")


def _number(minimum: float, *, strict: bool) -> type[float]:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
        if value != value or value < minimum or (strict and value == minimum):
            bound = f"above {minimum:g}" if strict else f"at least {minimum:g}"
            raise argparse.ArgumentTypeError(f"must be {bound}, not {text}")
        return value

    return parse  # type: ignore[return-value]


positive = _number(0, strict=True)
non_negative = _number(0, strict=False)

# The connection flags: accepted before or after the subcommand (SUPPRESS keeps a
# subcommand's unset flag from overwriting one given before it).
GLOBAL_DEFAULTS: dict[str, object] = {
    "address": None,
    "timeout": None,
    "client_id": None,
    "tls": False,
    "ca_file": None,
    "cert_file": None,
    "key_file": None,
    "server_name": None,
    "token_file": None,
}


def _connection_flags() -> Parser:
    flags = Parser(add_help=False, argument_default=argparse.SUPPRESS)
    group = flags.add_argument_group("connection (also from the environment)")
    group.add_argument(
        "--address",
        metavar="HOST:PORT",
        help=f"the service (env QUORUMQUEST_ADDRESS; default {DEFAULT_ADDRESS})",
    )
    group.add_argument(
        "--timeout", metavar="SECONDS", type=positive, help="deadline of each call to the service"
    )
    group.add_argument(
        "--client-id",
        metavar="ID",
        help="this client's identity in the lock (default HOST:PID:RANDOM)",
    )
    group.add_argument(
        "--tls",
        action="store_true",
        help="use TLS, verified against the system's roots (env QUORUMQUEST_TLS=true)",
    )
    group.add_argument(
        "--ca-file",
        metavar="PEM",
        help="verify the service against this CA (implies --tls; env QUORUMQUEST_TLS_CA_FILE)",
    )
    group.add_argument(
        "--cert-file",
        metavar="PEM",
        help="client certificate for mTLS (env QUORUMQUEST_TLS_CERT_FILE)",
    )
    group.add_argument(
        "--key-file", metavar="PEM", help="its private key (env QUORUMQUEST_TLS_KEY_FILE)"
    )
    group.add_argument(
        "--server-name",
        metavar="NAME",
        help="name the service's certificate must carry (env QUORUMQUEST_TLS_SERVER_NAME)",
    )
    group.add_argument(
        "--token-file",
        metavar="PATH",
        help="file holding a bearer token (env QUORUMQUEST_TOKEN_FILE, or the token "
        "itself in QUORUMQUEST_TOKEN; there is no --token flag, which ps would show)",
    )
    return flags


def build_parser() -> Parser:
    connection = _connection_flags()
    parser = Parser(
        prog="quorum-quest",
        description=DESCRIPTION,
        epilog=EXAMPLES + "\n" + EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[connection],
    )
    commands = parser.add_subparsers(dest="name", metavar="COMMAND", required=True)

    def command(
        name: str, arguments: str, summary: str, description: str
    ) -> argparse.ArgumentParser:
        return commands.add_parser(
            name,
            usage=f"quorum-quest {name} [options] {arguments}".rstrip(),
            help=summary,
            description=description,
            epilog=EXIT_CODES_HELP,
            formatter_class=argparse.RawDescriptionHelpFormatter,
            parents=[connection],
        )

    lock = command(
        "lock",
        "SERVICE DOMAIN -- COMMAND [ARG ...]",
        "run a command while holding a lock",
        LOCK_HELP,
    )
    lock.add_argument("service", metavar="SERVICE")
    lock.add_argument("domain", metavar="DOMAIN")
    lock.add_argument("command", nargs="*", default=[], help=argparse.SUPPRESS)
    lock.add_argument(
        "--ttl", type=positive, default=15.0, metavar="SECONDS", help="lease length (default 15)"
    )
    lock.add_argument(
        "--wait",
        type=non_negative,
        metavar="SECONDS",
        help="give up (exit 124) if the lock is not acquired in time; 0 tries once "
        "(default: wait as long as it takes)",
    )
    lock.add_argument(
        "--kill-grace",
        type=non_negative,
        default=5.0,
        metavar="SECONDS",
        help="after losing the lease, how long the command has between SIGTERM and "
        "SIGKILL (default 5)",
    )
    lock.add_argument(
        "--foreground",
        action="store_true",
        help="run the command in quorum-quest's own process group, so it can use the "
        "terminal; signals then reach the command alone, not what it started",
    )

    elect = command(
        "elect",
        "SERVICE DOMAIN",
        "campaign for leadership and hold it until interrupted",
        ELECT_HELP,
    )
    elect.add_argument("service", metavar="SERVICE")
    elect.add_argument("domain", metavar="DOMAIN")
    elect.add_argument(
        "--value", help="what others see as the leader: its client id (default HOST:PID:RANDOM)"
    )
    elect.add_argument(
        "--ttl", type=positive, default=15.0, metavar="SECONDS", help="lease length (default 15)"
    )
    elect.add_argument("--json", action="store_true", help="print the election as JSON")

    leader = command("leader", "SERVICE DOMAIN", "print who holds a lock", LEADER_HELP)
    leader.add_argument("service", metavar="SERVICE")
    leader.add_argument("domain", metavar="DOMAIN")
    leader.add_argument("--json", action="store_true", help="print one JSON object")

    watch = command(
        "watch", "SERVICE [DOMAIN]", "print every leadership change as it happens", WATCH_HELP
    )
    watch.add_argument("service", metavar="SERVICE")
    watch.add_argument("domain", metavar="DOMAIN", nargs="?")
    watch.add_argument("--json", action="store_true", help="one JSON object per line")

    status = command("status", "", "print the service's status", STATUS_HELP)
    status.add_argument("--json", action="store_true", help="print one JSON object")
    return parser


def parse(argv: list[str]) -> argparse.Namespace:
    """The options of `argv`; a usage error exits 125.

    Everything after the first `--` is `lock`'s command, taken as it is (its own
    flags included).
    """
    command: list[str] = []
    if "--" in argv:
        split = argv.index("--")
        argv, command = argv[:split], argv[split + 1 :]
    parser = build_parser()
    options = parser.parse_args(argv)
    for name, default in GLOBAL_DEFAULTS.items():
        if not hasattr(options, name):
            setattr(options, name, default)
    options.address = options.address or os.environ.get("QUORUMQUEST_ADDRESS") or DEFAULT_ADDRESS
    if options.name == "lock":
        if command and options.command:
            parser.error("lock: give the command after -- only")
        options.command = command or options.command
        if not options.command:
            parser.error("lock: no command to run (quorum-quest lock SERVICE DOMAIN -- COMMAND)")
    elif command:
        parser.error(f"{options.name} runs no command (nothing goes after --)")
    return options
