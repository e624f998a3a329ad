"""The promotion gate: pure rules over metric dicts, every outcome explained with its numbers."""

from __future__ import annotations

import math

import pytest

from recloop.registry import GateConfig, GateDecision, decide

POPULARITY = {
    "ndcg_at_10": 0.100,
    "recall_at_10": 0.12,
    "coverage": 0.01,
    "diversity": 0.20,
    "popularity_concentration": 1.0,
}
CHAMPION = {
    "ndcg_at_10": 0.200,
    "recall_at_10": 0.25,
    "coverage": 0.40,
    "diversity": 0.60,
    "popularity_concentration": 0.30,
}
SANE = {"finite_weights": True, "identical_list_share": 0.02, "distinct_items": 340}


def challenger(**overrides: float) -> dict[str, float]:
    return {**CHAMPION, "ndcg_at_10": 0.220, **overrides}


def gate(
    chal: dict, champ: dict | None = CHAMPION, sanity: dict = SANE, config: GateConfig | None = None
) -> GateDecision:
    return decide(
        challenger=chal,
        champion=champ,
        popularity=POPULARITY,
        sanity=sanity,
        config=config or GateConfig(),
        champion_version="3" if champ is not None else None,
    )


def reason(decision: GateDecision, check: str) -> str:
    matches = [r for r in decision.reasons if f" {check}:" in r]
    assert len(matches) == 1, decision.reasons
    return matches[0]


def test_first_model_better_than_popularity_is_promoted() -> None:
    decision = gate(challenger(ndcg_at_10=0.150), champ=None)
    assert decision.promote, decision.reasons
    assert decision.compared_to == "popularity"
    assert decision.checks["primary_metric"] is True
    # No champion: the relative guardrails are not applied, the absolute ones are.
    assert "coverage_guardrail" not in decision.checks
    absolute = {"popularity_concentration_guardrail", "finite_weights", "identical_lists", "distinct_items"}
    assert absolute <= set(decision.checks)
    assert reason(decision, "primary_metric").startswith("PASS")
    assert decision.metrics["challenger.ndcg_at_10"] == pytest.approx(0.150)
    assert decision.metrics["popularity.ndcg_at_10"] == pytest.approx(0.100)


def test_first_model_worse_than_popularity_is_refused_with_the_numbers() -> None:
    decision = gate(challenger(ndcg_at_10=0.090), champ=None)
    assert not decision.promote
    assert decision.checks["primary_metric"] is False
    text = reason(decision, "primary_metric")
    assert text.startswith("FAIL")
    assert "0.0900" in text and "0.1000" in text and "0.1020" in text  # ours, baseline, the bar
    assert "popularity" in decision.reasons[0] and "REFUSE" in decision.reasons[0]


def test_first_model_within_margin_of_popularity_is_refused() -> None:
    decision = gate(challenger(ndcg_at_10=0.101), champ=None)  # +1% < +2%
    assert not decision.promote
    assert decision.failed == ["primary_metric"]


def test_challenger_better_than_champion_by_the_margin_is_promoted() -> None:
    decision = gate(challenger(ndcg_at_10=0.205))  # +2.5%
    assert decision.promote, decision.reasons
    assert decision.compared_to == "champion:3"
    assert all(decision.checks.values())
    relative = {"coverage_guardrail", "diversity_guardrail", "concentration_increase_guardrail"}
    assert relative <= set(decision.checks)
    assert decision.reasons[0].startswith("PROMOTE")
    assert all(r.startswith("PASS") for r in decision.reasons[1:])


def test_challenger_better_by_less_than_the_margin_is_refused() -> None:
    decision = gate(challenger(ndcg_at_10=0.203))  # +1.5% < +2%
    assert not decision.promote
    assert decision.failed == ["primary_metric"]
    text = reason(decision, "primary_metric")
    assert "0.2030" in text and "0.2000" in text and "0.2040" in text and "+1.5%" in text


def test_margin_is_configurable() -> None:
    assert gate(challenger(ndcg_at_10=0.203), config=GateConfig(min_improvement=0.01)).promote


def test_equal_to_a_zero_baseline_is_not_an_improvement() -> None:
    decision = gate(challenger(ndcg_at_10=0.0), champ={**CHAMPION, "ndcg_at_10": 0.0})
    assert decision.checks["primary_metric"] is False


def test_better_but_coverage_collapsed_is_refused_naming_the_guardrail() -> None:
    decision = gate(challenger(ndcg_at_10=0.300, coverage=0.10))  # 0.10 < 0.8 * 0.40
    assert not decision.promote
    assert decision.checks["primary_metric"] is True
    assert decision.failed == ["coverage_guardrail"]
    text = reason(decision, "coverage_guardrail")
    assert "0.1000" in text and "0.4000" in text and "0.3200" in text
    assert "coverage_guardrail" in decision.reasons[0]


def test_better_but_less_diverse_is_refused() -> None:
    decision = gate(challenger(ndcg_at_10=0.300, diversity=0.50))  # < 0.9 * 0.60 = 0.54
    assert decision.failed == ["diversity_guardrail"]


def test_better_but_concentration_too_high_is_refused() -> None:
    # Absolute ceiling 0.5 and increase ceiling 0.30 + 0.1 are both broken.
    decision = gate(challenger(ndcg_at_10=0.300, popularity_concentration=0.55))
    assert not decision.promote
    assert set(decision.failed) == {"concentration_increase_guardrail", "popularity_concentration_guardrail"}
    assert "0.5500" in reason(decision, "popularity_concentration_guardrail")
    assert "0.4000" in reason(decision, "concentration_increase_guardrail")
    # Within the absolute ceiling but a jump of more than +0.1 over the champion.
    jump = gate(challenger(ndcg_at_10=0.300, popularity_concentration=0.45))
    assert jump.failed == ["concentration_increase_guardrail"]


def test_first_model_that_is_only_popularity_is_refused_by_the_absolute_ceiling() -> None:
    decision = gate(challenger(ndcg_at_10=0.150, popularity_concentration=0.9), champ=None)
    assert decision.failed == ["popularity_concentration_guardrail"]


def test_identical_lists_for_everyone_is_refused() -> None:
    degenerate = {"finite_weights": True, "identical_list_share": 1.0, "distinct_items": 10}
    decision = gate(challenger(ndcg_at_10=0.300), sanity=degenerate)
    assert not decision.promote
    assert set(decision.failed) == {"identical_lists", "distinct_items"}
    assert "100.0%" in reason(decision, "identical_lists")
    distinct = reason(decision, "distinct_items")
    assert "10 distinct items" in distinct and ">= 20" in distinct


def test_non_finite_weights_are_refused_even_for_the_first_model() -> None:
    decision = gate(challenger(ndcg_at_10=0.300), champ=None, sanity={**SANE, "finite_weights": False})
    assert decision.failed == ["finite_weights"]
    assert "not all finite" in reason(decision, "finite_weights")


def test_non_finite_primary_metric_is_refused() -> None:
    decision = gate(challenger(ndcg_at_10=float("nan")))
    assert decision.checks["primary_metric"] is False


def test_missing_sanity_and_guardrail_inputs_fail_rather_than_pass() -> None:
    chal = {"ndcg_at_10": 0.300}  # no coverage, diversity or concentration
    decision = gate(chal, sanity={})
    assert not decision.promote
    assert {
        "coverage_guardrail",
        "diversity_guardrail",
        "concentration_increase_guardrail",
        "popularity_concentration_guardrail",
        "finite_weights",
        "identical_lists",
        "distinct_items",
    } <= set(decision.failed)


def test_champion_without_a_guardrail_metric_skips_that_guardrail_visibly() -> None:
    champ = {k: v for k, v in CHAMPION.items() if k != "diversity"}
    decision = gate(challenger(ndcg_at_10=0.300), champ=champ)
    assert decision.promote
    assert "diversity_guardrail" not in decision.checks
    assert any(r.startswith("SKIP diversity_guardrail") for r in decision.reasons)


def test_distinct_items_floor_follows_k() -> None:
    sanity = {**SANE, "distinct_items": 30}
    assert gate(challenger(), sanity=sanity, config=GateConfig(k=10)).promote
    assert gate(challenger(), sanity=sanity, config=GateConfig(k=20)).failed == ["distinct_items"]
    assert gate(challenger(), sanity=sanity, config=GateConfig(k=20, min_distinct_items=25)).promote


def test_guardrail_metric_names_are_configurable() -> None:
    names = {"coverage": "catalog_coverage_at_10", "diversity": "intra_list_diversity_at_10"}
    renamed = {names.get(k, k): v for k, v in CHAMPION.items()}
    config = GateConfig(coverage_metric=names["coverage"], diversity_metric=names["diversity"])
    decision = gate({**renamed, "ndcg_at_10": 0.3, names["coverage"]: 0.1}, champ=renamed, config=config)
    assert decision.failed == ["coverage_guardrail"]
    assert "catalog_coverage_at_10 0.1000" in reason(decision, "coverage_guardrail")


def test_decision_serialises() -> None:
    decision = gate(challenger())
    as_dict = decision.to_dict()
    assert as_dict["promote"] is True and as_dict["compared_to"] == "champion:3"
    assert as_dict["checks"] == decision.checks


def test_concentration_ceiling_follows_classical_cf_on_data_where_it_concentrates() -> None:
    """A catalogue of well-known movies: tuned EASE itself puts 62 % of its slots on the top 1 %. The
    challenger may do what collaborative filtering does there (+0.10), not more; popularity still fails."""
    reference = {"als": {"popularity_concentration": 0.55}, "ease": {"popularity_concentration": 0.62}}
    kwargs = dict(champion=None, popularity=POPULARITY, sanity=SANE, config=GateConfig(), reference=reference)
    ok = decide(challenger=challenger(ndcg_at_10=0.150, popularity_concentration=0.69), **kwargs)
    assert ok.promote, ok.reasons
    assert "needs <= 0.7200 (ease 0.6200 on this data +0.10)" in reason(ok, "popularity_concentration_guardrail")
    too_much = decide(challenger=challenger(ndcg_at_10=0.150, popularity_concentration=0.80), **kwargs)
    assert not too_much.promote and too_much.checks["popularity_concentration_guardrail"] is False
    # Where CF spreads out, the absolute 0.5 stays the ceiling.
    low = {"ease": {"popularity_concentration": 0.20}}
    refused = decide(challenger=challenger(ndcg_at_10=0.150, popularity_concentration=0.55), champion=None,
                     popularity=POPULARITY, sanity=SANE, reference=low)
    assert not refused.promote and "needs <= 0.5000" in reason(refused, "popularity_concentration_guardrail")


def test_concentration_guardrails_judge_the_level_less_its_sampling_noise() -> None:
    """31 held-out users: 0.729 over a ceiling of 0.703 is within one standard error, not evidence of a
    degenerate model; the same level measured on thousands of users (a small standard error) is refused,
    as is a level far above the ceiling whatever the noise; `concentration_z=0` judges the level alone."""
    reference = {"ease": {"popularity_concentration": 0.6032}}
    kwargs = dict(champion=None, popularity=POPULARITY, sanity=SANE, reference=reference)
    noisy = challenger(ndcg_at_10=0.150, popularity_concentration=0.729, popularity_concentration_stderr=0.04)
    ok = decide(challenger=noisy, config=GateConfig(), **kwargs)
    assert ok.promote, ok.reasons
    assert "standard error 0.0400 over users: judged at 0.6632" in reason(ok, "popularity_concentration_guardrail")
    precise = challenger(ndcg_at_10=0.150, popularity_concentration=0.729, popularity_concentration_stderr=0.004)
    assert not decide(challenger=precise, config=GateConfig(), **kwargs).promote
    far = challenger(ndcg_at_10=0.150, popularity_concentration=0.95, popularity_concentration_stderr=0.04)
    assert not decide(challenger=far, config=GateConfig(), **kwargs).promote
    assert not decide(challenger=noisy, config=GateConfig(concentration_z=0), **kwargs).promote
    # Against a champion too.
    champ = {**CHAMPION, "popularity_concentration": 0.40}
    near = challenger(popularity_concentration=0.53, popularity_concentration_stderr=0.03)
    assert gate(near, champ).checks["concentration_increase_guardrail"] is True
    assert gate({**near, "popularity_concentration_stderr": 0.001}, champ).checks["concentration_increase_guardrail"] is False


def test_popularity_concentration_stderr_is_the_spread_over_users() -> None:
    from recloop.evaluation.metrics import popularity_concentration, popularity_concentration_stderr

    pop = {f"v{i}": float(1000 - i) for i in range(200)}  # top 1 %: v0, v1
    same = [["v0", "v5"], ["v1", "v6"], ["v0", "v7"], ["v1", "v8"]]
    assert popularity_concentration(same, pop) == 0.5
    assert popularity_concentration_stderr(same, pop) == 0.0
    mixed = [["v0", "v1"], ["v5", "v6"], ["v0", "v1"], ["v5", "v6"]]
    assert popularity_concentration(mixed, pop) == 0.5
    # Shares 1, 0, 1, 0: sample variance 1/3 over 4 lists -> 0.5 / sqrt(3).
    assert popularity_concentration_stderr(mixed, pop) == pytest.approx(0.5 / 3**0.5, rel=1e-9)
    assert math.isnan(popularity_concentration_stderr([["v0"]], pop))


def test_with_online_experiments_the_gate_asks_a_challenger_for_non_inferiority_only() -> None:
    """The online experiment judges the improvement: against a champion, a challenger within the margin
    passes, one below it is refused with the bar; the first model still has to beat popularity."""
    config = GateConfig(noninferiority_margin=0.05)
    slightly_worse = gate(challenger(ndcg_at_10=0.192), config=config)  # -4% > -5%
    assert slightly_worse.promote, slightly_worse.reasons
    assert "non-inferiority" in reason(slightly_worse, "primary_metric")
    worse = gate(challenger(ndcg_at_10=0.188), config=config)  # -6%
    assert worse.failed == ["primary_metric"]
    assert "0.1900" in reason(worse, "primary_metric")  # the bar: 0.95 x 0.200
    # The guardrails do not loosen.
    assert gate(challenger(ndcg_at_10=0.200, diversity=0.40), config=config).failed == ["diversity_guardrail"]
    # The first model: superiority over popularity, as without experiments.
    assert gate(challenger(ndcg_at_10=0.099), champ=None, config=config).failed == ["primary_metric"]
    # Without the margin (experiments off), the same slightly worse challenger is refused.
    assert gate(challenger(ndcg_at_10=0.192)).failed == ["primary_metric"]


def test_the_margin_follows_the_online_experiments_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    from recloop import lifecycle

    monkeypatch.delenv("RECLOOP_GATE_NONINFERIORITY_MARGIN", raising=False)
    monkeypatch.setenv("RECLOOP_ONLINE_EXPERIMENTS", "off")
    assert lifecycle.gate_config().noninferiority_margin is None
    monkeypatch.setenv("RECLOOP_ONLINE_EXPERIMENTS", "on")
    assert lifecycle.gate_config().noninferiority_margin == pytest.approx(0.05)
    monkeypatch.setenv("RECLOOP_GATE_NONINFERIORITY_MARGIN", "0.02")
    assert lifecycle.gate_config().noninferiority_margin == pytest.approx(0.02)
    monkeypatch.setenv("RECLOOP_GATE_NONINFERIORITY_MARGIN", "1.5")
    with pytest.raises(ValueError, match="RECLOOP_GATE_NONINFERIORITY_MARGIN"):
        lifecycle.gate_config()


# --- relative guardrails like for like ----------------------------------------------------------------

# A champion trained before many users joined: on all evaluated users its diversity is mostly the cold-start
# list it serves the newcomers (popular, then fresh: very diverse); on the 120 users both models know it is
# its personalised lists'.
CHAMPION_WAVE = {**CHAMPION, "diversity": 0.52, "coverage": 0.146,
                 "diversity_common": 0.22, "coverage_common": 0.146, "users_evaluated_common": 120}


def wave_challenger(**overrides: float) -> dict[str, float]:
    return challenger(**{"ndcg_at_10": 0.330, "diversity": 0.27, "coverage": 0.125, "diversity_common": 0.23,
                         "coverage_common": 0.124, "users_evaluated_common": 120, "ndcg_at_10_common": 0.15,
                         **overrides})


def test_coverage_and_diversity_are_compared_on_the_users_both_models_know() -> None:
    decision = gate(wave_challenger(), champ=CHAMPION_WAVE)
    assert decision.promote, decision.reasons
    text = reason(decision, "diversity_guardrail")
    assert text.startswith("PASS") and "on the 120 users both models know" in text
    assert "0.2300" in text and "0.2200" in text and "0.1980" in text  # ours, the champion's, 0.9 x theirs
    assert "0.2700" in text and "0.5200" in text  # the all-users numbers, said too
    assert "on the 120 users both models know" in reason(decision, "coverage_guardrail")
    # The primary metric stays on all evaluated users (the challenger is worse on the common users' NDCG).
    assert "0.3300" in reason(decision, "primary_metric") and "both models know" not in reason(decision, "primary_metric")
    assert decision.metrics["champion.diversity_common"] == pytest.approx(0.22)
    # The same numbers without the like-for-like rule: the cold-start lists' diversity refuses it.
    assert gate(wave_challenger(), champ=CHAMPION_WAVE, config=GateConfig(common_suffix=None)).failed == [
        "diversity_guardrail"]


def test_like_for_like_refuses_what_all_users_would_pass() -> None:
    # On all users 0.125 >= 0.8 x 0.146 = 0.1168; on the common users 0.10 < 0.1168.
    decision = gate(wave_challenger(coverage_common=0.10), champ=CHAMPION_WAVE)
    assert decision.failed == ["coverage_guardrail"]
    assert "0.1000 vs champion 0.1460 on the 120 users both models know" in reason(decision, "coverage_guardrail")


def test_like_for_like_needs_the_same_users_on_both_sides_else_all_users() -> None:
    only_challenger = gate(wave_challenger(), champ={k: v for k, v in CHAMPION_WAVE.items() if not k.endswith("_common")})
    assert only_challenger.failed == ["diversity_guardrail"]  # 0.27 < 0.9 x 0.52, on all users
    assert "both models know" not in reason(only_challenger, "diversity_guardrail")
    other_users = gate(wave_challenger(users_evaluated_common=80), champ=CHAMPION_WAVE)
    assert other_users.failed == ["diversity_guardrail"]
    assert "both models know" not in reason(other_users, "diversity_guardrail")
    nobody = gate(wave_challenger(users_evaluated_common=0), champ={**CHAMPION_WAVE, "users_evaluated_common": 0})
    assert nobody.failed == ["diversity_guardrail"]
    # A non-finite common number fails rather than passes.
    assert "diversity_guardrail" in gate(wave_challenger(diversity_common=math.nan), champ=CHAMPION_WAVE).failed


def test_like_for_like_keeps_the_non_inferiority_rule_and_the_concentration_guardrails_on_all_users() -> None:
    config = GateConfig(noninferiority_margin=0.05)
    decision = gate(wave_challenger(ndcg_at_10=0.195), champ=CHAMPION_WAVE, config=config)  # -2.5 %
    assert decision.promote, decision.reasons
    assert "non-inferiority" in reason(decision, "primary_metric")
    # Concentration is judged on all users even when a common-users number would pass.
    too_concentrated = gate(wave_challenger(popularity_concentration=0.45, popularity_concentration_common=0.2),
                            champ=CHAMPION_WAVE, config=config)
    assert too_concentrated.failed == ["concentration_increase_guardrail"]


def test_coverage_floor_follows_classical_cf_trained_on_the_same_window_when_it_is_lower() -> None:
    """Newer (closed-loop) data covers fewer videos: a challenger as broad as ALS/EASE trained on its own
    window passes; one narrower than those too is refused; a broad reference never raises the bar."""
    narrower = challenger(coverage=0.25)  # < 0.8 x champion's 0.40

    def judged(reference: dict) -> GateDecision:
        return decide(challenger=narrower, champion=CHAMPION, popularity=POPULARITY, sanity=SANE,
                      champion_version="3", reference=reference)

    assert gate(narrower).failed == ["coverage_guardrail"]
    data_allows = judged({"als": {"coverage": 0.24}, "ease": {"coverage": 0.28}})
    assert data_allows.promote, data_allows.reasons
    assert "ease's 0.2800 on this window" in reason(data_allows, "coverage_guardrail")
    assert judged({"als": {"coverage": 0.24}, "ease": {"coverage": 0.35}}).failed == ["coverage_guardrail"]
    assert judged({"ease": {"coverage": 0.90}}).failed == ["coverage_guardrail"]
