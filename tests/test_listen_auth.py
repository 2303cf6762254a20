"""Nothing is exposed to a network without a password: --listen and a non-loopback GRADIO_SERVER_NAME get a
generated login, as --share does, unless --auth is given; on a Hugging Face Space the platform decides."""

from __future__ import annotations

import urllib.error
import urllib.request

import pytest

from lorapg.config import Settings, load_settings


@pytest.mark.parametrize(
    ("overrides", "environ"),
    [
        ({"listen": True}, {}),
        ({}, {"GRADIO_SERVER_NAME": "0.0.0.0"}),
        ({}, {"GRADIO_SERVER_NAME": "192.168.1.20"}),
        ({}, {"GRADIO_SERVER_NAME": "::"}),
        ({}, {"GRADIO_SERVER_NAME": "workstation.lan"}),
        ({}, {"LORAPG_LISTEN": "1"}),
    ],
    ids=["listen", "all-interfaces", "lan-address", "ipv6-any", "host-name", "lorapg-listen"],
)
def test_an_address_other_machines_reach_gets_a_generated_password(overrides, environ):
    settings = load_settings(None, overrides, environ=environ)
    assert settings.reachable_from_network
    password = settings.ensure_share_auth()
    assert password and len(password) >= 12
    assert settings.auth_pair() == ("lorapg", password)


@pytest.mark.parametrize("name", ["", "127.0.0.1", "127.0.0.2", "localhost", "::1", "[::1]"])
def test_the_loopback_needs_no_password(name):
    settings = load_settings(None, {}, environ={"GRADIO_SERVER_NAME": name} if name else {})
    assert not settings.reachable_from_network
    assert settings.ensure_share_auth() is None and settings.auth is None


def test_an_explicit_login_is_kept():
    settings = Settings(listen=True, auth="me:secret")
    assert settings.ensure_share_auth() is None
    assert settings.auth_pair() == ("me", "secret")


def test_on_a_space_only_a_share_link_asks_for_a_password():
    # A Space serves on GRADIO_SERVER_NAME=0.0.0.0 behind the platform's proxy, which decides who gets in.
    space = load_settings(None, {}, environ={"GRADIO_SERVER_NAME": "0.0.0.0"})
    assert space.ensure_share_auth(on_spaces=True) is None and space.auth is None
    assert Settings(listen=True).ensure_share_auth(on_spaces=True) is None
    assert Settings(share=True).ensure_share_auth(on_spaces=True)


def test_app_started_with_listen_requires_the_printed_login(tiny_models, tmp_path):
    from gradio_client import Client

    from tests.app_server import running_app

    log = tmp_path / "app.log"
    (tmp_path / "loras").mkdir()
    args = (
        "--model",
        str(tiny_models["sd15"]),
        "--outputs",
        str(tmp_path / "outputs"),
        "--lora-dir",
        str(tmp_path / "loras"),
        "--no-preload",
        "--listen",
    )
    with running_app(*args, log_path=log) as url:
        line = next(line for line in log.read_text().splitlines() if "password '" in line)
        assert "Login required (serving on 0.0.0.0)" in line and "user 'lorapg'" in line
        password = line.split("password '")[1].split("'")[0]
        assert len(password) >= 12
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"{url}config", timeout=30)
        assert refused.value.code == 401
        with pytest.raises(Exception):  # noqa: B017 - gradio_client raises different types for 401
            Client(url, verbose=False)
        with pytest.raises(Exception):  # noqa: B017
            Client(url, auth=("lorapg", "not-the-password"), verbose=False)
        client = Client(url, auth=("lorapg", password), verbose=False)
        assert client.predict([], api_name="/refresh_loras")["choices"] == []
