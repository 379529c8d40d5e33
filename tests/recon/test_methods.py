"""The method table: one meaning per name (prior methods are the settings with the table's changes),
the parameters each kind takes, and the scripts' parsing of method lists."""

from __future__ import annotations

import dataclasses

import pytest

from recon.biasrecon import BiasReconSettings
from recon.config import AdaptConfig, method_settings
from recon.errors import InputError
from recon.methods import (
    FINETUNE_LR,
    LORA_LR,
    CLASSICAL_METHODS,
    METHODS,
    PRIOR_METHODS,
    check_params,
    method_parameters,
    parse_lambdas,
    parse_methods,
    prior_settings,
    run_baseline,
)


def test_prior_methods_are_the_run_settings_with_the_tables_changes():
    base = BiasReconSettings(num_steps=7, lam=0.02, lr=0.1)
    replace = dataclasses.replace
    assert prior_settings(base, "biasrecon") == base
    assert prior_settings(base, "biasrecon_nosure") == replace(base, sure=False)
    assert prior_settings(base, "unadapted") == replace(base, adapt="none", sure=False)
    assert prior_settings(base, "unadapted_sure") == replace(base, adapt="none", sure=True)
    assert prior_settings(base, "finetune") == replace(base, adapt="full", lr=FINETUNE_LR)
    assert prior_settings(base, "lora") == replace(base, adapt="lora", lr=LORA_LR)
    assert prior_settings(base, "learned_lam") == replace(base, adapt="lam", sure=False)
    assert prior_settings(base, "oracle_gamma") == replace(base, calib_loss="reference")
    assert prior_settings(base, "prior_dc") == replace(base, adapt="none", sure=False, lam=1e-4, num_steps=50,
                                                       sigma_start=1.0, sigma_end=0.01)
    assert prior_settings(base, "unadapted", {"lam": 0.5, "lam_grid": [0.1, 1]}) == \
        replace(base, adapt="none", sure=False, lam=0.5, lam_grid=(0.1, 1.0))  # parameters come last
    with pytest.raises(InputError, match="prior method"):
        prior_settings(base, "sense")
    with pytest.raises(InputError, match="lam"):
        prior_settings(base, "unadapted", {"lam": -1.0})


def test_adapt_configs_methods_are_the_tables():
    """adapt.py's config reads the same table: its 'unadapted' is the section with the same changes."""
    config = AdaptConfig()
    section = method_settings(config, "biasrecon")
    for name in PRIOR_METHODS:
        assert method_settings(config, name) == prior_settings(section, name)
    assert section == BiasReconSettings()  # the section's defaults are the library's


def test_parameters_of_each_kind():
    assert set(CLASSICAL_METHODS) | set(PRIOR_METHODS) == set(METHODS)
    assert set(method_parameters("tv")) == {"lam", "max_iter", "step", "seed"}
    assert set(method_parameters("unadapted")) == {f.name for f in dataclasses.fields(BiasReconSettings)}
    check_params("unadapted_sure", {"num_steps": 30, "lam_grid": [0.01, 0.1]})
    with pytest.raises(InputError, match="'prior'"):
        check_params("unadapted", {"prior": "x"})  # the prior is --prior, not a parameter
    with pytest.raises(InputError, match="num_steps"):
        check_params("unadapted", {"num_steps": 0})


def test_parse_methods_and_run_baseline_refuses_prior_methods():
    assert parse_methods("all") == list(CLASSICAL_METHODS)
    assert parse_methods("all+prior") == list(METHODS)
    assert parse_methods("sense, unadapted,sense") == ["sense", "unadapted"]
    with pytest.raises(InputError, match="'magic'"):
        parse_methods("sense,magic")
    with pytest.raises(InputError, match="empty"):
        parse_methods(" , ")
    with pytest.raises(InputError, match="classical"):
        run_baseline("unadapted", None, None)


def test_lambda_lists_parse_in_order_and_refuse_what_a_grid_cannot_hold():
    assert parse_lambdas("1e-3, 0.01,,0.3", "here") == [1e-3, 0.01, 0.3]
    assert parse_lambdas("0,0.1", "here") == [0.0, 0.1]  # λ = 0 is a valid oracle candidate
    with pytest.raises(InputError, match="key '--lambda-grid' is '0,0.1', expected a comma list of positive"):
        parse_lambdas("0,0.1", "command line: key '--lambda-grid'", positive=True)
    for bad in ("", "x", "nan", "0.1,inf", "-0.1"):
        with pytest.raises(InputError, match="here is .*non-negative numbers"):
            parse_lambdas(bad, "here")
