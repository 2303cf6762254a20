"""LoRA Playground: ``python app.py`` builds the services (``build_services``), then serves the UI."""

from __future__ import annotations

import argparse
import logging
import signal
import sys

import lorapg.hosting.zerogpu  # noqa: F401  (first: on a ZeroGPU Space `spaces` must be imported before torch)
from lorapg.quiet import quiet_third_party_imports

quiet_third_party_imports()  # before anything imports transformers or bitsandbytes

from lorapg.cli import LLM_SETTING_FLAGS, add_llm_arguments, add_settings_arguments, settings_from_args  # noqa: E402
from lorapg.errors import UserError  # noqa: E402
from lorapg.hosting.space_policy import server_host, space_policy, writable_outputs  # noqa: E402
from lorapg.hosting.zerogpu import running_on_spaces  # noqa: E402

log = logging.getLogger("lorapg.app")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="LoRA Playground web app")
    add_settings_arguments(parser)
    add_llm_arguments(parser)
    parser.add_argument("--listen", action="store_true", default=None, help="serve on 0.0.0.0 (all interfaces)")
    parser.add_argument("--port", type=int, help="port (default 7860)")
    parser.add_argument("--share", action="store_true", default=None, help="create a public Gradio share link")
    parser.add_argument("--auth", help="user:password required to open the app")
    parser.add_argument(
        "--no-preload",
        dest="load_model_at_start",
        action="store_false",
        default=None,
        help="load the base model on first use instead of right after start",
    )
    return parser.parse_args(argv)


def private_output_paths(settings) -> list[str]:
    outputs = settings.outputs.resolve()
    database = settings.gallery_db.resolve()
    return [
        str(p)
        for p in (
            database,
            database.with_name(database.name + "-wal"),
            database.with_name(database.name + "-shm"),
            outputs / "working_state.json",
            outputs / "working_states",
            outputs / ".visitor_secret",
        )
    ]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from lorapg.services.build import build_services, configure_logging

    configure_logging(args.verbose)
    try:
        settings = settings_from_args(
            args, extra=("listen", "port", "share", "auth", "load_model_at_start", *LLM_SETTING_FLAGS)
        )
        generated_password = settings.ensure_share_auth(on_spaces=running_on_spaces())
        from lorapg.api.auth import api_access

        access = api_access(settings, space_policy(settings))
        auth = settings.auth_pair()
        if running_on_spaces():
            settings.outputs = writable_outputs(settings.outputs)
        runtime = build_services(settings)
        policy = runtime.policy
        # Only the app repairs the gallery, at start-up: a CLI run beside a running app must not
        # delete the app's in-flight temp files or import PNGs it is about to record.
        for line in runtime.gallery.reconcile():
            log.info("gallery repair: %s", line)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    from lorapg.hosting.visitors import browser_secret
    from lorapg.services.lora_manager import build_lora_manager
    from lorapg.ui.app_ui import build_ui
    from lorapg.working_state import VisitorWorkingStates, WorkingState

    # Browser-session state (drafts, the visitor cookie key): the web app's alone, not a service.
    if policy.private_visitors:
        working_state = VisitorWorkingStates(settings.outputs / "working_states")
        secret = browser_secret(settings.outputs / ".visitor_secret")
    else:
        working_state, secret = WorkingState(settings.outputs / "working_state.json"), None
    demo = build_ui(
        runtime.service,
        runtime.gallery_service,
        working_state,
        prompt_service=runtime.prompts,
        training_service=runtime.training,
        visitors=runtime.visitors,
        visitor_secret=secret,
        lora_manager=build_lora_manager(runtime),
        caption_service=runtime.captions,
        upscale_service=runtime.upscale,
    )
    if generated_password:
        # Printed, not logged: the user needs to read it once, log files should not keep it.
        why = "Share link protection" if settings.share else f"Login required (serving on {settings.host})"
        print(f"\n  {why}: user 'lorapg', password '{generated_password}' (set your own with --auth)\n", flush=True)
    routes = api_routes_for(runtime, access)
    if settings.load_model_at_start:
        try:
            if policy.zero_gpu:
                # ZeroGPU packs the weights on the (virtual) GPU when the app launches: they must all be
                # there. Loaded here, in the main thread: `spaces` emulates CUDA only in the thread that
                # imported it (torch modes are thread-local), so the job queue's thread must not load.
                runtime.engine.load_model(settings.model)
            else:
                runtime.service.submit_load_model()  # in the background: the UI is served meanwhile
        except UserError as exc:
            log.warning("not loading the base model at start: %s", exc)
    stop = _stopper(runtime)
    # SIGTERM (docker stop, systemd, a supervisor) shuts down like Ctrl+C: through `finally` below. SIGINT
    # is set too: a shell starts a background job with SIGINT ignored, and Python then keeps it ignored.
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        serve(demo, settings, policy, auth, routes)
    finally:
        shut_down(runtime)
    return 0


def _stopper(runtime):
    def stop(signum, frame) -> None:
        # Cancel first: the web server, closing, waits for requests in flight, and an API request waits
        # for its job; a cancelled job ends at its next step.
        runtime.jobs.cancel_all()
        raise KeyboardInterrupt

    return stop


def shut_down(runtime) -> None:
    """Stop the GPU queue and the LLM threads before the interpreter exits.

    Their worker threads are daemons: one still inside torch while the interpreter shuts down aborts
    the process ("terminate called without an active exception", exit status 134). The running job
    stops at its next step; queued jobs end as cancelled without running.
    """
    stopped = runtime.close(timeout=60)  # worker discovery (--ray), then the GPU queue
    if runtime.prompts is not None:
        runtime.prompts.close(timeout=60)
    if runtime.training is not None:  # the webhook of a run that ended just now
        runtime.training.close_notifications(timeout=15)
    log.info("shut down%s", "" if stopped else " (the GPU queue was still busy after 60 s)")


def serve(demo, settings, policy, auth, routes) -> None:
    """Serve until interrupted (Gradio's `launch` blocks; Ctrl+C or SIGTERM returns from it)."""
    demo.queue(default_concurrency_limit=None).launch(
        server_name=server_host(settings, policy),
        server_port=settings.port,
        share=settings.share,
        auth=[auth] if auth else None,
        show_error=True,
        # Gallery images are served from their files (so downloads keep the PNG metadata), and
        # --outputs may point outside the working directory. Only the images: the database, drafts
        # and the visitor secret beside them are never served, whatever path is asked for.
        allowed_paths=[str(settings.gallery_images.resolve())],
        blocked_paths=private_output_paths(settings),
        max_file_size=policy.max_upload_bytes,
        # The REST API's routes go in before the server starts (FastAPI's `routes`), beside Gradio's own.
        # Gradio's own /openapi.json would describe its internal routes to anyone: the API serves its own.
        app_kwargs={"routes": routes, "openapi_url": None},
    )


def api_routes_for(runtime, access) -> list:
    """The API's routes when --api asks for them (and says why not when it may not be served)."""
    if not runtime.settings.api:
        return []
    if not access.enabled:
        log.warning("REST API not served: %s", access.reason)
        return []
    from lorapg.api import api_routes

    if access.generated_password:
        # Printed, not logged, as for the share link: the user reads it once, log files do not keep it.
        print(f"\n  REST API protection: user 'api', password '{access.generated_password}'\n", flush=True)
    auth_note = " with HTTP Basic auth" if access.users else ""
    log.info("REST API at /sdapi/v1 (AUTOMATIC1111's) and /api/v1, documented at /docs%s", auth_note)
    return api_routes(runtime, access)


if __name__ == "__main__":
    try:
        sys.exit(main())
    finally:  # SystemExit, and Ctrl+C that arrived before Gradio's launch() returned
        from lorapg.process_exit import skip_the_final_collection

        skip_the_final_collection()
