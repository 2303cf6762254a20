"""Input limits and echoed values (issue 13): a huge id or reference is refused or cut short in the
message, never sent back (and logged) in full."""

from __future__ import annotations

import pytest

from lorapg.config import load_settings
from lorapg.errors import UserError, check_ref_length, shorten
from lorapg.jobs import JobQueue

HUGE = "x" * 10_000_000  # the 10 MB job id / model ref of the issue


def test_shorten_keeps_short_text_and_cuts_long_text_saying_how_long():
    assert shorten("job 1") == "job 1"
    assert shorten("a" * 80) == "a" * 80
    cut = shorten(HUGE, 80)
    assert cut.startswith("x" * 79 + "…") and "10000000 characters" in cut and len(cut) < 120


def test_check_ref_length_names_the_field():
    assert check_ref_length("org/model", "Base model") == "org/model"
    with pytest.raises(UserError, match=r"^Job id is 10000000 characters long; it can be at most 4096"):
        check_ref_length(HUGE, "Job id")


def test_an_unknown_huge_job_id_is_not_echoed_in_full():
    queue = JobQueue()
    try:
        with pytest.raises(UserError, match="Unknown job id") as caught:
            queue.get(HUGE)
        assert len(str(caught.value)) < 100
    finally:
        queue.shutdown()


def test_cancelling_a_training_run_with_a_huge_job_id_is_not_echoed_in_full(tmp_path):
    from lorapg.services.build import build_services

    settings = load_settings(
        None,
        {
            "models_dir": str(tmp_path / "models"),
            "outputs": str(tmp_path / "out"),
            "lora_dir": str(tmp_path / "models" / "loras"),
        },
        environ={},
    )
    runtime = build_services(settings)
    try:
        with pytest.raises(UserError, match="No training run with job id") as caught:
            runtime.training.cancel(HUGE)
        assert len(str(caught.value)) < 100
        with pytest.raises(UserError, match=r"Model path .*\(4001 characters\) cannot be read") as caught:
            runtime.service.load_model("/" + HUGE[:4000])
        assert len(str(caught.value)) < 300
    finally:
        runtime.jobs.shutdown()


def test_an_app_reachable_from_other_machines_does_not_reveal_which_paths_exist(tiny_models, tmp_path):
    from gradio_client import Client

    from tests.app_server import running_app

    (tmp_path / "secret").mkdir()  # exists but is not a model: the owner would hear "no model_index.json"
    args = ("--model", str(tiny_models["sd15"]), "--outputs", str(tmp_path / "out"), "--threads", "1")
    # Reachable from other machines means a login (a generated one without --auth): give one.
    with running_app(*args, "--no-preload", "--listen", "--auth", "owner:test-password") as url:
        client = Client(url, auth=("owner", "test-password"), verbose=False)
        answers = set()
        for ref in (str(tmp_path / "secret"), str(tmp_path / "nothing"), "/etc"):
            with pytest.raises(Exception, match="outside this app's models folder") as caught:
                client.predict(ref, api_name="/load_model")
            answers.add(str(caught.value).replace(shorten(ref), "REF"))  # long temp paths are cut in the message
        assert len(answers) == 1
        assert "SD 1" in client.predict(api_name="/load_model")[0]  # the owner's configured model still loads
