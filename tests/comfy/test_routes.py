"""nodes/routes.py's messages to the browser: progress text reaches the client of the running prompt through the
host's PromptServer, and is skipped without a server, without a client or on a host lacking progress text."""
from __future__ import annotations

import pytest


class FakePromptServer:
    """Records what the pack sends; `progress_text=False` is a host without PromptServer.send_progress_text."""

    def __init__(self, client_id, progress_text: bool = True):
        self.client_id = client_id
        self.sent = []
        if progress_text:
            self.send_progress_text = lambda text, node_id, sid=None: self.sent.append(("text", text, node_id, sid))

    def send_sync(self, event, data, sid=None):
        self.sent.append((event, data, sid))


@pytest.fixture
def routes(comfy_host):
    return comfy_host.pack_module("nodes.routes")


def test_host_has_progress_text(comfy_host):
    import server

    assert callable(getattr(server.PromptServer, "send_progress_text", None))


def test_progress_text_reaches_the_prompt_client(routes, monkeypatch):
    import server

    fake = FakePromptServer("client-1")
    monkeypatch.setattr(server.PromptServer, "instance", fake, raising=False)
    routes.send_progress_text("4", "step 3/20 · loss 0.1234")
    assert fake.sent == [("text", "step 3/20 · loss 0.1234", "4", "client-1")]


@pytest.mark.parametrize("fake", [None, FakePromptServer(None), FakePromptServer("client-1", progress_text=False)],
                         ids=["no server", "no client", "host without progress text"])
def test_progress_text_skipped_without_a_place_to_show_it(routes, monkeypatch, fake):
    import server

    monkeypatch.setattr(server.PromptServer, "instance", fake, raising=False)
    routes.send_progress_text("4", "step 3/20 · loss 0.1234")  # no error
    assert fake is None or fake.sent == []
