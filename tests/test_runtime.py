from __future__ import annotations

import pytest

from service.batcher import NotAccepting
from service.config import Settings
from service.runtime import ModelNotFound, Runtime


def test_serving_refuses_until_ready_and_while_draining():
    runtime = Runtime(Settings())
    with pytest.raises(NotAccepting, match="not ready yet") as err:
        runtime.serving()
    assert err.value.reason == "not_ready"
    runtime.draining = True
    with pytest.raises(NotAccepting, match="shutting down") as err:
        runtime.serving("quicknet-xs")
    assert err.value.reason == "draining"


def test_select_and_get_name_what_is_missing():
    runtime = Runtime(Settings())
    assert runtime.select() == []
    with pytest.raises(ModelNotFound, match="'nope' is not served"):
        runtime.select("nope")
