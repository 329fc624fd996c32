"""`rollout serve MODEL [fleet options] [--host 127.0.0.1] [--port 8000] [--api-key KEY]`.

Starts a fleet and the OpenAI-compatible server in the foreground; Ctrl-C (SIGINT) or SIGTERM
stops the server, then the fleet. The api key may also come from $ROLLOUT_API_KEY, so it need
not appear in the process list.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from typing import Any


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "serve",
        help="OpenAI-compatible HTTP server on a fleet (completions, chat, streaming, weight sync, metrics)",
        description=(
            "Start a rollout fleet on MODEL and serve it over HTTP: POST /v1/completions and "
            "/v1/chat/completions (streaming with \"stream\": true; tool calls as OpenAI tool_calls), GET /v1/models, POST /v1/weights "
            "(sync from an HF directory or repo id), GET /v1/status, GET /health, GET /metrics "
            "(Prometheus). Binds 127.0.0.1 unless --host says otherwise; any other address needs "
            "--api-key. Needs the `serve` extra: pip install \"rollout[serve]\"."
        ),
    )
    p.add_argument("model", help="HF checkpoint directory or repo id")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 = any free port)")
    p.add_argument("--api-key", default=os.environ.get("ROLLOUT_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1 routes (default: $ROLLOUT_API_KEY)")
    p.add_argument("--served-model-name", default=None, help="the model name clients send (default: MODEL)")
    from rollout.engine.backend import BACKENDS
    from rollout.engine.config import DTYPES, KV_LAYOUTS, LOAD_FORMATS, QUANTIZATIONS, SWAP_POLICIES, EngineConfig
    from rollout.fleet_config import FleetConfig

    p.add_argument("--workers", type=int, default=1, help="engines (Ray workers)")
    p.add_argument("--devices-per-worker", type=int, default=1, help="devices per engine (simulated on CPU)")
    p.add_argument("--accelerator", default=FleetConfig.accelerator, help="auto, cpu, tpu or gpu")
    p.add_argument("--engine", default=FleetConfig.engine, choices=sorted(BACKENDS),
                   help="engine backend (sglang-jax: Python >= 3.12, the sglang extra; no logprobs)")
    p.add_argument("--dtype", default=EngineConfig.dtype, choices=DTYPES)
    p.add_argument("--max-batch", type=int, default=EngineConfig.max_batch, help="decode slots per engine")
    p.add_argument("--max-seq-len", type=int, default=EngineConfig.max_seq_len, help="prompt + new tokens per sample")
    p.add_argument("--decode-steps", type=int, default=EngineConfig.decode_steps, help="decode steps per host round trip")
    p.add_argument("--load-format", default=EngineConfig.load_format, choices=LOAD_FORMATS)
    p.add_argument("--swap-policy", default=EngineConfig.swap_policy, choices=SWAP_POLICIES)
    p.add_argument("--kv-layout", default=EngineConfig.kv_layout, choices=KV_LAYOUTS,
                   help="contiguous (one max_seq_len region per slot) or paged (a shared pool of pages)")
    p.add_argument("--page-size", type=int, default=EngineConfig.page_size, help="paged: positions per page")
    pool = p.add_mutually_exclusive_group()
    pool.add_argument("--kv-pages", type=int, default=EngineConfig.kv_pages,
                      help="paged: pool size in pages (default: the contiguous layout's memory)")
    pool.add_argument("--kv-memory-fraction", type=float, default=EngineConfig.kv_memory_fraction,
                      help="paged, TPU/GPU: pool = this fraction of device memory, less what is in use")
    p.add_argument("--kv-admission-ratio", type=float, default=EngineConfig.kv_admission_ratio,
                   help="paged: expected share of max_tokens still to generate, for admission (default: learned)")
    p.add_argument("--batch-invariant", action="store_true", default=EngineConfig.batch_invariant,
                   help="bitwise-reproducible tokens and logprobs whatever the batch (native engine, dense models; slower)")
    p.add_argument("--quantization", default=EngineConfig.quantization, choices=QUANTIZATIONS,
                   help="weight-only int8 (or fp8 on TPU v5p+/H100) of the linear layers, re-quantized at every "
                        "sync (default: none, the --dtype weights)")
    p.add_argument("--no-prefix-cache", dest="prefix_cache", action="store_false", default=EngineConfig.prefix_cache,
                   help="paged: do not keep prompts' pages for later prompts that start the same way")
    p.add_argument("--reasoning-parser", default=None, choices=["qwen3"],
                   help="split <think>...</think> off into the message's reasoning_content (default: off)")
    p.add_argument("--tool-call-parser", default="hermes", choices=["hermes", "none"],
                   help="chat requests with tools: <tool_call>{json}</tool_call> -> tool_calls (hermes, the "
                        "default: Qwen2.5/Qwen3) or none (calls stay text)")
    p.add_argument("--log-level", default="info", help="uvicorn log level")
    p.set_defaults(run=run)


def service_options(args: argparse.Namespace) -> dict:
    """The fleet and engine options of `rollout serve`'s flags, for RolloutService."""
    names = ("accelerator", "dtype", "max_batch", "max_seq_len", "decode_steps", "load_format", "swap_policy",
             "engine", "kv_layout", "page_size", "kv_pages", "kv_memory_fraction", "kv_admission_ratio", "batch_invariant",
             "quantization", "prefix_cache")
    return {name: getattr(args, name) for name in names}


def run(args: argparse.Namespace) -> int:
    from rollout.server.auth import check_bind

    try:
        check_bind(args.host, args.api_key)  # before a fleet is started
    except ValueError as err:
        sys.exit(f"error: {err}")
    if args.accelerator in ("cpu", "auto"):
        from trainer_stub.clients import configure_devices

        configure_devices(args.devices_per_worker, "cpu" if args.accelerator == "cpu" else None)
    try:  # fail before starting a fleet, with the install hint
        import fastapi  # noqa: F401
        import prometheus_client  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as err:
        sys.exit(f"error: `rollout serve` needs the server libraries ({err.name} is missing): "
                 'pip install "rollout[serve]"')
    from rollout.coordinator.service import RolloutService
    from rollout.server.handle import Server

    service = RolloutService(args.model, args.workers, args.devices_per_worker, **service_options(args))
    try:
        server = Server(service, owns_service=True, host=args.host, port=args.port, api_key=args.api_key or None,
                        model_name=args.served_model_name or args.model, log_level=args.log_level,
                        reasoning_parser=args.reasoning_parser,
                        tool_call_parser=None if args.tool_call_parser == "none" else args.tool_call_parser)
    except BaseException:
        service.shutdown()
        raise
    print(json.dumps({"event": "serving", "url": server.url, "model": server.state.model_name,
                      "workers": args.workers, "api_key": bool(server.state.api_key)}), flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        while not stop.wait(0.5):
            pass
    finally:
        print(json.dumps({"event": "stopping", "url": server.url}), flush=True)
        server.shutdown()  # the HTTP server, then the fleet
    return 0
