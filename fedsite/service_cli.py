"""`fedsite certs | coordinator | client`: argument parsing for the networked service only."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def cmd_certs(args: argparse.Namespace) -> int:
    from coordinator.certs import write_service_files

    paths, node_keys = write_service_files(args.out, args.host, args.days, args.clients, args.force)  # CertError: one line
    print(f"CA {paths.ca_cert}\nserver certificate {paths.server_cert} (key {paths.server_key})")
    for private, public in node_keys:
        print(f"client key {private} (enrol {public})")
    return 0


def cmd_coordinator(args: argparse.Namespace) -> int:
    from coordinator.service import ServiceError, ServiceSettings, run_coordinator
    from fedsite.cli import config_from_args, option_labels, start_live_dashboard
    from simulations.preflight import preflight

    settings = ServiceSettings(
        address=args.address,
        certs=args.certs,
        insecure=args.insecure,
        auth=not args.no_auth,
        enroll=args.enroll,
        state=args.state,
        artifacts=args.artifacts,
        artifact_key=args.artifact_key,
        artifact_address=args.artifact_address,
        superlink_port=args.superlink_port,
        max_request_mb=args.max_request_mb,
    )
    try:
        config = preflight(config_from_args(args), option_labels(args))  # data, model, packages: before anything starts
        settings.validate()  # a bad option fails here, before the dashboard prints its address
        from finetune.device import placement

        placement(config.device, config.dtype)  # central evaluation's --device: DeviceError (one line) before anything starts
        start_live_dashboard(args.dashboard, args.certs, config.out)
        return run_coordinator(config, settings)
    except ServiceError as err:
        print(f"fedsite: error: {err}", file=sys.stderr)
        return 1


def cmd_client(args: argparse.Namespace) -> int:
    from client.edge import EdgeSettings, run_edge
    from simulations.preflight import check_examples

    if args.data and Path(args.data).exists():
        check_examples("data", args.data, None)  # a malformed line: one line with its number, before the SuperNode starts

    settings = EdgeSettings(
        coordinator=args.coordinator,
        data=args.data,
        root_certificates=args.root_certificates,
        key=args.key,
        artifact_public_key=args.artifact_public_key,
        insecure=args.insecure,
        memory_gb=args.memory_gb,
        holds_backbone=not args.no_backbone,
        quantized=args.quantized,
        profile=args.profile,
        device=args.device,
        runtime_port=args.runtime_port,
        max_retries=args.max_retries,
        max_wait_time=args.max_wait_time,
        poll_interval=args.poll_interval,
        threads=args.threads,
        dp_min_noise=args.dp_min_noise,
        epsilon_budget=args.epsilon_budget,
        delta=args.delta,
        privacy_ledger=args.privacy_ledger,
    )
    return run_edge(settings, args.home)


def add_service_parsers(sub: argparse._SubParsersAction) -> None:
    from client.supernode import DEFAULT_POLL_SECONDS
    from fedsite.cli import add_config_options, add_dashboard_option

    certs = sub.add_parser("certs", help="make a test CA, server certificate and client keys", description="Write a self-signed CA (ca.crt), a server certificate it signs (server.pem, server.key; SANs localhost, 127.0.0.1 and --host) and client enrolment keys, for testing the service. Private keys are created owner-only (0600); existing files are never overwritten without --force. Use certificates from a real CA in production.")
    certs.add_argument("--out", required=True, help="folder to write the files into")
    certs.add_argument("--host", action="append", default=[], help="extra host name or IP the coordinator is reached at (repeatable)")
    certs.add_argument("--clients", type=int, default=0, help="also make this many client key pairs in OUT/clients/ (default: 0)")
    certs.add_argument("--days", type=int, default=365, help="validity in days (default: 365)")
    certs.add_argument("--force", action="store_true", help="replace the CA, server certificate and client keys already in OUT (clients must then trust the new ca.crt and be enrolled again); without it an existing file is an error")
    certs.set_defaults(func=cmd_certs)

    coordinator = sub.add_parser("coordinator", help="serve a run to edge clients over the network (Flower SuperLink + ServerApp)", description="Start Flower's SuperLink on loopback with TLS and SuperNode authentication behind a gateway that serves only the Fleet API on --address, enrol the clients' public keys, submit the Fedsite app with the run options below and follow it to the end. An interrupted run resumes from the checkpoint in --out.")
    coordinator.add_argument("--address", default="0.0.0.0:9092", help="public HOST:PORT of the gateway, which forwards the Fleet API only (default: 0.0.0.0:9092)")
    coordinator.add_argument("--certs", default=None, help="folder with ca.crt, server.pem, server.key (`fedsite certs --out DIR`); the certificate must also name 127.0.0.1")
    coordinator.add_argument("--insecure", action="store_true", help="no TLS (and no node authentication): loopback addresses only")
    coordinator.add_argument("--no-auth", action="store_true", help="admit any client, not only enrolled keys: loopback addresses only")
    coordinator.add_argument("--superlink-port", type=int, default=0, help="port of Flower's SuperLink on 127.0.0.1, never public (default: 0 = a free one)")
    coordinator.add_argument("--max-request-mb", type=float, default=512.0, help="largest request body the gateway passes on, in MiB (default: 512)")
    coordinator.add_argument("--enroll", action="append", default=[], metavar="PUB", help="a client's public key (.pub) or a folder of them to admit (repeatable)")
    coordinator.add_argument("--state", default=None, help="folder for Flower's state, database and logs (default: OUT/service)")
    coordinator.add_argument("--artifacts", default=None, metavar="STORE", help="also serve this artifact store (signed, content-addressed backbones and emulators) over gRPC with the same TLS certificate, to enrolled clients only")
    coordinator.add_argument("--artifact-key", default=None, help="the artifact store's Ed25519 signing key (PEM): the run's own (default: OUT/keys/signing_key.pem, made on the first start; clients pin OUT/keys/public_key.pem)")
    coordinator.add_argument("--artifact-address", default=None, help="HOST:PORT of the artifact service (default: --address's host, port 9093)")
    add_dashboard_option(coordinator, certs_option=False)
    add_config_options(coordinator)
    coordinator.set_defaults(func=cmd_coordinator)

    client = sub.add_parser("client", help="join a coordinator as an edge client (Flower SuperNode) on this device's data", description="Start a Flower SuperNode running the Fedsite ClientApp on this device's own data; it keeps reconnecting if the coordinator restarts.")
    client.add_argument("--coordinator", required=True, metavar="HOST:PORT", help="the coordinator's address")
    client.add_argument("--data", required=True, help="this device's data: a .jsonl file (instruction/input/output) or a datasets folder")
    client.add_argument("--root-certificates", default=None, metavar="CA", help="the coordinator's CA certificate (ca.crt); default: the system's CAs")
    client.add_argument("--key", default=None, help="this client's enrolment private key (OpenSSH EC key; its .pub is enrolled at the coordinator); also signs artifact fetches")
    client.add_argument("--artifact-public-key", default=None, metavar="PEM", help="the coordinator's artifact-signing public key (its OUT/keys/public_key.pem): emulator packages are verified against it, never against a key from the round message; without it this client declines emulator packages")
    client.add_argument("--insecure", action="store_true", help="no TLS: local tests only")
    client.add_argument("--memory-gb", type=float, default=0.0, help="device profile: memory for the backbone in GB (default: 0 = unlimited)")
    client.add_argument("--no-backbone", action="store_true", help="device profile: this device may not hold the full backbone (gets an offsite emulator)")
    client.add_argument("--quantized", action="store_true", help="device profile: load the frozen backbone in 4-bit")
    client.add_argument("--profile", default="", help="device profile name, for the coordinator's records")
    client.add_argument("--device", default="auto", help="where this client trains: auto (first CUDA GPU, else CPU), cpu, cuda, cuda:N or mps; its accelerator (kind, memory) goes into the device profile (default: auto)")
    client.add_argument("--runtime-port", type=int, default=9094, help="local port of the SuperNode's Runtime API; one per client on a machine (default: 9094)")
    client.add_argument("--max-retries", type=int, default=None, help="give up after this many reconnection attempts (default: never)")
    client.add_argument("--max-wait-time", type=float, default=None, help="give up after this many seconds of reconnecting (default: never)")
    client.add_argument("--poll-interval", type=float, default=DEFAULT_POLL_SECONDS, metavar="S", help="seconds between the SuperNode's pulls for work while idle; each is one request to the coordinator (Flower's own SuperNode waits 3 s; default: %(default)s)")
    client.add_argument("--threads", type=int, default=0, help="torch threads for local training (default: 0 = all cores)")
    privacy = client.add_argument_group("privacy policy (enforced on this device, whatever the coordinator asks)")
    privacy.add_argument("--dp-min-noise", type=float, default=0.0, metavar="Z", help="train only with local DP-SGD at a noise multiplier of at least Z; rounds asking for less, or for no local DP, are declined (default: 0 = no policy)")
    privacy.add_argument("--epsilon-budget", type=float, default=0.0, metavar="EPS", help="decline any round that would bring this device's cumulative epsilon on its data past EPS, over all runs (default: 0 = none)")
    privacy.add_argument("--delta", type=float, default=0.0, help="account privacy at this delta or lower (default: the round's)")
    privacy.add_argument("--privacy-ledger", default=None, metavar="FILE", help="this device's privacy accountant (default: one per --data under ~/.cache/fedsite/client-state/)")
    client.add_argument("--home", default=None, help="Flower's folder for this client (default: fedsite-client-<runtime-port> under $FLWR_HOME or ~/.flwr, one per client)")
    client.set_defaults(func=cmd_client)
