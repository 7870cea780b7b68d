import json

import pytest
import torch
from torch import nn

from fastlatent.models import ConfigMixin, load_pretrained, register_model


@register_model
class _TinyConfigModel(nn.Module, ConfigMixin):
    def __init__(self, width: int = 3, sizes=(1, 2), name: str = "x"):
        super().__init__()
        self.lin = nn.Linear(width, width)
        self.tied = self.lin.weight


class _Derived(_TinyConfigModel):
    def __init__(self, extra: float = 0.5, **kwargs):
        super().__init__(**kwargs)


def test_config_records_outermost_arguments():
    m = _TinyConfigModel(4, sizes=(3,))
    assert m.config == {"width": 4, "sizes": [3], "name": "x"}
    assert _Derived(extra=1.0, width=2).config == {"extra": 1.0, "width": 2}
    assert type(m).from_config(m.config).lin.in_features == 4


def test_non_json_argument_is_rejected():
    with pytest.raises(TypeError, match="width must be a JSON value"):
        _TinyConfigModel(width=torch.tensor(3))


def test_save_load_round_trip(tmp_path):
    m = _TinyConfigModel(5)
    m.save_pretrained(tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json", "model.safetensors"]
    loaded = load_pretrained(tmp_path / "m")
    assert isinstance(loaded, _TinyConfigModel) and loaded.config == m.config
    torch.testing.assert_close(loaded.lin.weight, m.lin.weight)
    with pytest.raises(ValueError, match="expected one of"):
        load_pretrained(tmp_path / "m", expected=nn.Conv2d)


def test_load_refuses_unknown_classes_and_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_pretrained(tmp_path)
    _TinyConfigModel().save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"class": "os.system", "config": {}}))
    with pytest.raises(ValueError, match="unknown model class 'os.system'"):
        load_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("not json")
    with pytest.raises(ValueError, match="not a fastlatent model config"):
        load_pretrained(tmp_path)
