"""`twistd labelgw`: command-line options and the service they make."""

from __future__ import annotations

import sys
from typing import Any

from twisted.python import usage

from labelgw.cli import config
_DEFAULTS = config.DEFAULTS


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = (
        "Routes HTTP to Docker containers by their labels (labelgw.service=NAME, ...). "
        "Settings may also come from a YAML file (--config); command-line values win."
    )
    optParameters = [
        ["docker-host", None, None, "Docker engine URL [default: $DOCKER_HOST, else the local socket]"],
        ["label-prefix", None, None, f"Prefix of the labels labelgw reads [default: {_DEFAULTS.label_prefix}]"],
        ["env", None, None, "Route only containers whose <prefix>.env label is NAME"],
        ["config", "c", None, "YAML file with the same settings plus static services"],
        ["connect-timeout", None, None,
         f"Seconds to connect to a backend before answering 502 [default: {_DEFAULTS.proxy.connect_timeout:g}]"],
        ["response-timeout", None, None,
         f"Seconds to wait for a backend's response before answering 504 [default: {_DEFAULTS.proxy.response_timeout:g}]"],
        ["state-dir", None, None, "Directory of the local CA and cached certificates [default: $XDG_DATA_HOME/labelgw, "
         "else ~/.local/share/labelgw]"],
        ["cert-dir", None, None, "Directory of your own PEM certificates, picked up while running (default.pem: the "
         "default certificate)"],
        ["balancer", None, None, "Default balancer of services without a <prefix>.balancer label: wrt, least_conn, "
         f"round_robin or hash [default: {_DEFAULTS.balancer}]"],
        ["admin", None, None, f"Endpoint of the admin JSON view, or none [default: {_DEFAULTS.admin}]"],
        ["version-header", None, None,
         f"Request header that pins a request to one version [default: {_DEFAULTS.version_header}]"],
        ["access-log", None, None, f"Access log format: common, json or off [default: {_DEFAULTS.access_log}]"],
        ["access-log-file", None, None, "Write the access log to this file (reopened on SIGUSR1) [default: standard output]"],
        ["swarm-poll", None, None, "With --swarm: seconds between two listings of the services' tasks (the engine "
         f"sends no task events) [default: {_DEFAULTS.swarm_poll:g}]"],
        ["registry-api", None, None, "Endpoint of the registration API (PUT /v1/services/...), or none; loopback unless "
         "an interface= is named [default: none]"],
        ["registry-token-file", None, None, "File with the bearer token the registration API requires (required when "
         "--registry-api is not on loopback)"],
        ["registry", None, None, "Where registrations live: embedded (memory + state directory) or "
         "etcd://HOST:PORT[,HOST:PORT...] [default: embedded]"],
        ["registry-prefix", None, None, "etcd key prefix of the registrations [default: /labelgw/registrations/]"],
        ["registry-ca", None, None, "CA certificate (PEM) of the etcd members: speak TLS to them"],
        ["registry-cert", None, None, "Client certificate (PEM) for etcd"],
        ["registry-key", None, None, "Client key (PEM) for etcd"],
        ["registry-user", None, None, "etcd user name (with --registry-password-file)"],
        ["registry-password-file", None, None, "File with the etcd user's password"],
        ["tls-engine", None, None, "TLS engine of the HTTPS listeners: stdlib (Python's ssl) or openssl (Twisted's "
         "pyOpenSSL layer) [default: stdlib]"],
        ["acme-email", None, None, "Get certificates for public host names from an ACME server (Let's Encrypt), with "
         "this contact address; ACME is off without it"],
        ["acme-directory", None, None, "ACME directory URL [default: Let's Encrypt production; staging: "
         "https://acme-staging-v02.api.letsencrypt.org/directory]"],
        ["acme-ca-bundle", None, None, "PEM file of the CA that signs the ACME server's own HTTPS certificate (a private "
         "ACME server) [default: the usual trust store]"],
        ["acme-challenge", None, None, "ACME challenge: auto (HTTP-01 and TLS-ALPN-01 in turn), http-01 or "
         "tls-alpn-01 [default: auto]"],
        ["workers", None, None, "Serve with N worker processes under a supervising one (auto: one per core); SIGHUP "
         "then replaces them without a failed request [default: 1, in this process]"],
        ["acme-on-demand-max", None, None, "Names one label under a public wildcard route that get their own ACME "
         "certificate when a handshake asks for them, at most, per wildcard [default: 100]"],
    ]
    optFlags = [
        ["tls-strict", None, "Refuse TLS handshakes for unknown names instead of serving the default certificate"],
        ["redirect-https", None, "Answer every plain-HTTP request with a 308 redirect to HTTPS"],
        ["debug-headers", None, "Add response headers naming the service, version and backend that answered"],
        ["swarm", None, "Route the labelled Docker Swarm services of this manager (their deploy.labels) instead of "
         "containers"],
    ]

    def __init__(self) -> None:
        usage.Options.__init__(self)
        self["http"] = []
        self["https"] = []
        self["admin-host"] = []
        self["trusted-proxies"] = []

    def opt_http(self, endpoint: str) -> None:
        """Listen for HTTP on a Twisted endpoint, e.g. tcp:8080 or tcp:8080:interface=127.0.0.1 (repeatable)
        [default: tcp:8080]"""
        self["http"].append(endpoint)

    def opt_https(self, endpoint: str) -> None:
        """Listen for HTTPS on a Twisted endpoint such as tcp:8443 (repeatable; none: no HTTPS) [default: tcp:8443]"""
        self["https"].append(endpoint)

    def opt_admin_host(self, name: str) -> None:
        """A host name the admin view answers besides localhost, *.localhost and loopback addresses (repeatable)"""
        self["admin-host"].append(name)

    def opt_trusted_proxies(self, networks: str) -> None:
        """CIDR networks (comma-separated, repeatable) of proxies in front of labelgw: from them, the client is the
        last untrusted X-Forwarded-For address"""
        self["trusted-proxies"].append(networks)

    def opt_version(self) -> None:
        from labelgw import __version__

        print(f"labelgw {__version__}")
        raise SystemExit(0)

    def parseOptions(self, options: Any = None) -> None:
        # The options as given: the workers of a supervisor (--workers) parse the same ones.
        self.argv = list(sys.argv[1:] if options is None else options)
        try:
            usage.Options.parseOptions(self, options)
        except usage.UsageError as error:
            if getattr(self, "parent", None) is None:
                raise  # called directly (tests, tools): the caller reports it
            # Under twistd, whose handler prints the whole --help before the error: one line and a hint instead.
            raise SystemExit(brief_usage_error(error)) from None

    def postOptions(self) -> None:
        try:
            self.settings = settings_from_options(self)
        except config.ConfigError as error:
            raise usage.UsageError(str(error)) from None
        self.workers = parse_workers(self["workers"])


def parse_workers(value: str | None) -> int | None:
    """--workers: None when not given (one process serves), else the number of worker processes."""
    if value is None:
        return None
    if value.strip().lower() == "auto":
        import os

        try:
            return max(1, len(os.sched_getaffinity(0)))
        except AttributeError:  # not Linux
            return max(1, os.cpu_count() or 1)
    try:
        count = int(value)
    except ValueError:
        raise usage.UsageError(f"--workers {value!r}: a number of processes or auto") from None
    if not 1 <= count <= 1024:
        raise usage.UsageError(f"--workers {value!r}: from 1 to 1024")
    return count


def brief_usage_error(error: Exception, program: str = "twistd labelgw") -> str:
    """The message for a bad option: the error on one line, then where the full list of options is."""
    first = str(error).strip().splitlines()[0] if str(error).strip() else "bad option"
    return f"{program}: {first}\nRun '{program} --help' for the list of options."


def settings_from_options(options: Any) -> config.Settings:
    file = config.load_file(options["config"]) if options["config"] else {}
    cli = {
        "http": list(options["http"]),
        "docker_host": options["docker-host"],
        "label_prefix": options["label-prefix"],
        "env": options["env"],
        "connect_timeout": options["connect-timeout"],
        "response_timeout": options["response-timeout"],
        "https": list(options["https"]),
        "state_dir": options["state-dir"],
        "cert_dir": options["cert-dir"],
        # Flags are 0/1; an absent one is None, not False, so that the file's value applies.
        "tls_strict": True if options["tls-strict"] else None,
        "redirect_https": True if options["redirect-https"] else None,
        "balancer": options["balancer"],
        "admin": options["admin"],
        "admin_hosts": list(options["admin-host"]),
        "version_header": options["version-header"],
        "access_log": options["access-log"],
        "access_log_file": options["access-log-file"],
        "debug_headers": True if options["debug-headers"] else None,
        "trusted_proxies": list(options["trusted-proxies"]),
        "swarm": True if options["swarm"] else None,
        "swarm_poll": options["swarm-poll"],
        "registry_api": options["registry-api"],
        "registry_token_file": options["registry-token-file"],
        "registry": options["registry"],
        "registry_prefix": options["registry-prefix"],
        "registry_ca": options["registry-ca"],
        "registry_cert": options["registry-cert"],
        "registry_key": options["registry-key"],
        "registry_user": options["registry-user"],
        "registry_password_file": options["registry-password-file"],
        "tls_engine": options["tls-engine"],
        "acme_email": options["acme-email"],
        "acme_directory": options["acme-directory"],
        "acme_ca_bundle": options["acme-ca-bundle"],
        "acme_challenge": options["acme-challenge"],
        "acme_on_demand_max": options["acme-on-demand-max"],
    }
    settings = config.build(cli, file)
    _check_endpoints(settings.http)
    _check_endpoints(settings.https, "--https")
    if settings.admin is not None:
        _check_endpoints((settings.admin,), "--admin")
    if settings.registration.api is not None:
        _check_endpoints((settings.registration.api,), "--registry-api")
    return settings


def _check_endpoints(descriptions: tuple[str, ...], option: str = "--http") -> None:
    from twisted.internet.endpoints import _parseServer  # parsing only: nothing listens yet

    for description in descriptions:
        problem = _port_problem(description)
        if problem is not None:
            raise config.ConfigError(f"{option} {description!r}: not a valid endpoint: {problem}")
        try:
            _parseServer(description, None)
        except Exception as error:  # the parser raises several kinds of errors; all mean the same to a user
            raise config.ConfigError(f"{option} {description!r}: not a valid endpoint ({error})") from None


def _port_problem(description: str) -> str | None:
    """What is wrong with the port of a tcp/tcp6/ssl endpoint, in words (the parser only says int() failed)."""
    kind, _, rest = description.partition(":")
    if kind not in ("tcp", "tcp6", "ssl"):
        return None
    port = rest.split(":", 1)[0]
    if "=" in port:
        return None  # port=N given as a keyword: the parser's message will do
    if not port:
        return "no port given"
    if not port.isdigit():
        return f"port {port!r} is not a number"
    if int(port) > 65535:
        return f"port {port} is out of range (0-65535)"
    return None


def default_reactor() -> Any:
    """The reactor to run on: the one already installed (`twistd --reactor`, tests), else labelgw's lean epoll
    reactor where epoll exists (labelgw.cli.reactor: ~15 % less CPU per proxied request), else Twisted's default."""
    if "twisted.internet.reactor" not in sys.modules:
        import select

        if hasattr(select, "epoll"):
            from labelgw.cli.reactor import install

            return install()
    from twisted.internet import reactor

    return reactor


def makeService(options: Options) -> Any:
    from labelgw.cli import quietlog
    from labelgw.cli.app import LabelgwService

    reactor = default_reactor()
    quietlog.enable()  # Twisted's port lines and labelgw's debug lines out of twistd's log (labelgw.cli.quietlog)

    workers = getattr(options, "workers", None)
    if workers is not None:
        # A supervisor holding the sockets, N worker processes serving them (labelgw.workers); SIGHUP replaces
        # the workers (after re-reading the config file, when there is one).
        from labelgw.workers.supervisor import SupervisorService, install as install_supervisor

        supervisor = SupervisorService(options.settings, reactor, workers, getattr(options, "argv", []))
        install_supervisor(supervisor, reactor, options["config"], lambda: settings_from_options(options))
        return supervisor
    service = LabelgwService(options.settings, reactor)
    # The --config file watched and re-applied while running; SIGHUP re-reads it (labelgw.cli.reload).
    from labelgw.cli.reload import install as install_reload

    install_reload(service, reactor, options["config"], lambda: settings_from_options(options))
    return service
