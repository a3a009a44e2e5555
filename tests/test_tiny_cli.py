import subprocess
import sys

from transformers import AutoModelForCausalLM, AutoTokenizer


def test_tiny_family_command_builds_loadable_models(tmp_path):
    res = subprocess.run([sys.executable, "-m", "evomerge", "tiny", str(tmp_path / "fam"), "--experts", "1",
                          "--hidden", "16", "--layers", "2"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    for name in ("base", "expert0"):
        model = AutoModelForCausalLM.from_pretrained(tmp_path / "fam" / name)
        assert model.config.num_hidden_layers == 2
    tok = AutoTokenizer.from_pretrained(tmp_path / "fam" / "base")
    assert tok.decode(tok("x=7").input_ids) == "x=7"
