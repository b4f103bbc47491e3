"""The one console line: the documented keys in order, absent keys left out, NaN shown."""
from __future__ import annotations

from adapt_pretrain.monitor import console_line


def test_full_line_in_documented_order():
    scalars = {"adapt/weight_std": 0.125, "train/mfu": 0.4321, "loss": 2.5, "lr": 3e-4, "grad_norm": 1.25,
               "train/tokens_per_s": 123456.7, "train/tflops_per_device": 427.3, "adapt/weight_mean": 0.5,
               "adapt/ess": 99.0}
    assert console_line(7, scalars) == ("[step 7] loss=2.5000 lr=3.00e-04 grad_norm=1.25 tok/s=123,457 "
                                        "TFLOP/s=427 MFU=43.2% w_mean=0.500 w_std=0.125")


def test_missing_keys_are_left_out_and_nan_is_shown():
    # CPU run with ADAPT off: no MFU, no weights; a NaN loss must not disappear
    line = console_line(3, {"loss": float("nan"), "lr": 1e-3, "train/tokens_per_s": 10.0,
                            "train/tflops_per_device": 0.001})
    assert line == "[step 3] loss=nan lr=1.00e-03 tok/s=10 TFLOP/s=0.001"
    assert "MFU" not in line and "w_mean" not in line


def test_other_scalars_fall_back_to_the_first_six():
    assert console_line(0, {"a": 1.0, "b": 2.5}) == "[step 0] a=1 b=2.5"
