"""The rounds of a :class:`pwfn.Fixer` under the accuracy contract: tries, undo after training, backtrack.

A round tries the settings of its ladder in order (the method's caution levels, fewer new weights, a finer
codebook) until one keeps the contract right after fixing; a round that training follows is judged again
after that training (:meth:`ContractRounds.settle`) and undone from a snapshot (weights, masks, optimizers,
budget, RNG) when it does not keep it; a round that cannot keep it at any setting may send the round before
back once. docs/algorithm.md, "The accuracy contract". This mixin works on the Fixer's attributes.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
from typing import Any, Optional

import torch

from ..common.hints import setting
from ..errors import ContractError
from .train import rng_state, set_rng_state

log = logging.getLogger("pwfn.training.fixer")


def _within(bound: float, allowed: float) -> bool:
    """A drop (or its bound) within an allowance, with float rounding's slack; NaN never is."""
    return math.isfinite(bound) and bound <= allowed * (1 + 1e-9) + 1e-12


class ContractRounds:
    """How a round keeps the accuracy contract (a mixin of :class:`pwfn.Fixer`)."""

    def settle(self) -> bool:
        """Judge the training since the last round against the contract (``fix_next`` does it first; the
        built-in loop calls it right after training, before its checkpoint).

        Returns True when there is nothing to judge or the model is within the contract (the last round is
        then final). Otherwise that round is undone - the model's weights, masks and buffers, the state of
        every optimizer that stepped it, the budget and the RNG restored to just before it - and False is
        returned: the next :meth:`fix_next` redoes it more cautiously. Raises ContractError (with the model
        restored) when no more cautious setting is left.
        """
        pending = self._pending
        if pending is None or self.contract is None:
            return True
        self._pending = None
        c, ref = self.contract, self.reference
        now = self.assess()
        value, drop = now["value"], now["drop"]
        row = self.history[-1]
        row["contract"].update(after_training=value, drop_after_training=drop, se_after_training=now["se"])
        # paced: with a share f of the weights fixed, at most max(early_share, f) of the allowance may be spent,
        # so the last rounds (which no training follows) keep some; early rounds would otherwise spend it all
        allowed = c.max_drop * min(1.0, max(self.cfg.contract.early_share, self._fixed_count() / self.view.numel))
        row["contract"]["allowed_after_training"] = allowed
        # what training between rounds recovers here: the immediate check of the next rounds expects as much
        immediate = row["contract"]["bound"]
        if math.isfinite(immediate) and math.isfinite(now["bound"]):
            self._recovery = min(max(immediate / max(now["bound"], 1e-12 * max(c.max_drop, 1e-12)), 1.0),
                                 self.cfg.contract.recovery_factor)
        nxt = pending["position"] + 1
        last = nxt >= len(pending["ladder"])
        paced = _within(now["bound"], allowed)
        fixed_state = pending.get("fixed_state")
        if not paced and fixed_state is not None and _within(row["contract"]["bound"], allowed) \
                and row["contract"]["bound"] < now["bound"]:
            # the training made it worse than the fixing left it: that training is undone, the fixing kept
            with torch.no_grad():
                self.model.load_state_dict(fixed_state)
            self._restore_optimizers(pending["snapshot"])
            log.info("%s round %d: after training %s is %.6g against the float model's %.6g, worse than the %.6g the "
                     "round's fixing left (contract: %s): that training is undone and the fixing kept", self.method,
                     self.round, c.metric, value, ref, row["contract"]["value"], c.text())
            row["contract"].update(training_undone={"after_training": value, "drop": drop, "se": now["se"]},
                                   after_training=row["contract"]["value"],
                                   drop_after_training=row["contract"]["drop"],
                                   se_after_training=row["contract"]["se"])
            value, paced = row["contract"]["value"], True
        # the pace is a plan, the contract the promise: at the most cautious setting a round within the
        # contract itself is kept (the rounds after it have less left), never failed for the pace alone
        if paced or (last and _within(now["bound"], c.max_drop)):
            row["contract"]["paced"] = paced
            if not paced:
                log.info("%s round %d: after training %s is %.6g against the float model's %.6g: beyond this point's "
                         "pace (%.4g of the %g allowed) at the most cautious setting, within the contract: kept",
                         self.method, self.round, c.metric, value, ref, allowed, c.max_drop)
            self._settled = value
            self.caution = pending["level"]
            # kept for one backtrack: when the next round cannot keep the contract at all, this one is redone
            self._previous = {key: pending[key] for key in ("snapshot", "ladder", "position", "undone", "before",
                                                            "setting", "target", "extra")}
            if pending["extra"]:
                log.warning("%s round %d: the contract was kept only with %d more power-of-two terms per value: the "
                            "codebook is finer from here on (max_order %d)", self.method, self.round, pending["extra"],
                            self.engine_config.max_order)
            return True
        self._restore(pending["snapshot"])
        self.history.pop()
        self.round -= 1
        failed = {"setting": pending["setting"], "fraction": pending["target"], "extra_terms": pending["extra"],
                  "after_fix": row["contract"]["value"], "after_training": value}
        if last:
            self.method_impl.set_caution(self.caution)
            if self._backtrack(failed):  # the round before spent what this one needed: it is redone first
                return False
            raise ContractError(
                f"{self.method} round {self.round + 1}: even after training, fixing "
                f"{100 * pending['target']:.4g} % of the weights ({pending['setting']}) leaves {c.metric} at "
                f"{value:.6g} against the float model's {ref:.6g} on the guard data: a drop of {drop:.4g} (+- "
                f"{now['se']:.2g}; judged with {setting('contract.margin')}), beyond the contract ({c.text()}), "
                f"and no more cautious setting is left. The model is left as it was before this "
                f"round ({100 * self._fixed_count() / self.view.numel:.4g} % fixed, within the contract). To go on: "
                f"{self.method_impl.contract_tip()}, or allow a larger drop ({setting('contract.max_drop')}, now "
                f"{c.max_drop:g} {c.drop_type})")
        self._redo = {"ladder": pending["ladder"], "position": nxt, "undone": pending["undone"] + [failed],
                      "before": pending["before"]}
        log.info("%s round %d: after training %s is %.6g against the float model's %.6g (contract: %s): the round "
                 "is undone and redone more cautiously", self.method, self.round + 1, c.metric, value, ref, c.text())
        return False

    def _backtrack(self, failed: dict[str, Any]) -> bool:
        """When a round cannot keep the contract at any setting, undo the round before it too (its fixing and
        the training after it) and have it redone at its next, more cautious setting: it may have spent what
        this round needed. Once per planned round; False when there is none to go back to (or it has no setting
        left)."""
        prev = self._previous
        self._previous = None
        if prev is None or self.round < 1 or prev["position"] + 1 >= len(prev["ladder"]):
            return False
        origin = self.schedule_index[self.round - 1]
        if origin in self._backtracked:  # once per planned round: no going back and forth
            return False
        self._backtracked.add(origin)
        log.info("%s round %d cannot keep the contract at any setting: round %d is undone too and redone more "
                 "cautiously", self.method, self.round + 1, self.round)
        self._pending = None
        self._restore(prev["snapshot"])
        self.history.pop()
        self.round -= 1
        undone = {"setting": prev["setting"], "fraction": prev["target"], "extra_terms": prev["extra"],
                  "backtracked_for_next_round": failed}
        self._redo = {"ladder": prev["ladder"], "position": prev["position"] + 1,
                      "undone": prev["undone"] + [undone], "before": prev["before"]}
        return True

    def _fixed_count(self) -> int:
        return int(self.view.fixed().sum())

    def _max_caution(self) -> int:
        """The highest caution level the method accepts (its current level is left as it was)."""
        now, level = getattr(self.method_impl, "caution", 0), 0
        while level < 16 and self.method_impl.set_caution(level + 1):
            level += 1
        self.method_impl.set_caution(now)
        return level

    def _ladder(self, t: int) -> list[tuple[int, float, int]]:
        """Round ``t``'s tries in order, as (caution level, fraction to fix, extra power-of-two terms)."""
        cc, n = self.cfg.contract, self.view.numel
        fixed_now = self._fixed_count()
        prev, frac = fixed_now / n, self.fractions[t]
        origin = self.schedule_index[t]
        # each round may halve what is left of its increment up to max_splits times; one planned round grows
        # into at most 2 * max_splits extra rounds
        added = sum(1 for i in self.schedule_index if i == origin) - 1
        splits = cc.max_splits if added < 2 * cc.max_splits else 0
        targets = [frac] + [prev + (frac - prev) / 2.0**s for s in range(1, splits + 1)]
        targets = [x for i, x in enumerate(targets) if i == 0 or math.ceil(x * n - 1e-9) > fixed_now]
        top = self._max_caution()
        first = min(max(self.caution - 1, 0), top)
        # the first half of the method's caution levels (PWFN: k down to 0.5) at every size of the round, then
        # the deeper ones at the smallest size: fewer new weights keep the codebook smaller than a tiny tolerance
        half = math.ceil((top + 1) / 2)
        if first < half:
            ladder = [(level, x, 0) for x in targets for level in range(first, half)]
            ladder += [(level, targets[-1], 0) for level in range(half, top + 1)]
        else:
            ladder = [(level, x, 0) for x in targets for level in range(first, top + 1)]
        base = self.engine_config.max_order
        if self.budget is None:  # the last resort: a finer codebook, never a lossy one
            ladder += [(top, targets[-1], e) for e in range(1, cc.extra_terms + 1) if base + e <= 32]
        return ladder

    def _contracted_round(self, t: int, broadcast, before: Optional[float],
                          redo: Optional[dict]) -> tuple[dict, dict[str, Any]]:
        """Round ``t`` under the contract: the first try of its ladder (from ``redo``'s position when a try was
        undone after training) that the immediate check keeps; ContractError (model restored) when none does."""
        c, view = self.contract, self.view
        assert c is not None and self.reference is not None
        ref = self.reference
        info = self.guard_info
        if t == 0 and redo is None and info.get("examples") is not None and info["examples"] < info.get("needed", 0):
            log.warning("%s: the contract's guard scores only %d examples; telling %s from noise needs %d, so small "
                        "losses can pass unseen. Give it more validation data, or training examples to add "
                        "(fixer.top_up_guard(train_loader); pwfn.compress and the callbacks do it unless "
                        "contract.guard_from_train=false)", self.method, info["examples"], c.text(), info["needed"])
        if redo is not None:
            ladder, position, undone, before = redo["ladder"], redo["position"], redo["undone"], redo["before"]
        else:
            ladder, position, undone = self._ladder(t), 0, []
            if before is None:
                before = self.measure()
            if not c.holds(ref, before):  # the measured drop itself: no margin for a state already kept
                raise ContractError(
                    f"{self.method}: before round {t + 1} fixes anything, {c.metric} on the guard data is {before:.6g} "
                    f"against the float model's {ref:.6g}: the training since "
                    f"{'the last round' if t else 'the start'} already breaks the contract ({c.text()}). The model is "
                    "left as it is. Train more gently (a lower learning rate) or allow a larger drop "
                    f"({setting('contract.max_drop')})")
        saved = (view.values(), view.fixed(), view.sigmas() if view.has_sigma else None)
        frac, origin, n = self.fractions[t], self.schedule_index[t], view.numel
        extra_before = self.extra_terms
        base_engine = self.engine_config
        tries: list[dict[str, Any]] = []
        kept = None
        start = position
        level, target, extra = ladder[start]
        snapshot = None
        for at in range(start, len(ladder)):
            position = at
            level, target, extra = ladder[at]
            follows = target < 1.0  # training follows a round that leaves weights free
            if follows and snapshot is None:
                snapshot = self._snapshot()
            self.method_impl.set_caution(level)
            self.engine_config = (dataclasses.replace(base_engine, max_order=base_engine.max_order + extra)
                                  if extra else base_engine)
            summary, merged = self._fix_once(t, target, broadcast)
            now = self.assess()
            allowed = c.max_drop * (self._recovery if follows else 1.0)
            tries.append({"caution": level, "setting": self.method_impl.caution_text(), "fraction": target,
                          "extra_terms": extra, "value": now["value"], "drop": now["drop"], "se": now["se"],
                          "bound": now["bound"]})
            if _within(now["bound"], allowed):
                kept = summary
                break
            view.write(*saved)  # undo the try: nothing trained since it
            if self.budget is not None:
                self.budget.merged_weights -= merged
                self.budget.merges_per_round.pop()
        if kept is None:
            self.engine_config = base_engine
            most = self.method_impl.caution_text()
            self.method_impl.set_caution(self.caution)
            best = min(tries, key=lambda r: r["drop"] if math.isfinite(r["drop"]) else math.inf)
            raise ContractError(
                f"{self.method} round {t + 1}: fixing {100 * frac:.4g} % of the weights breaks the accuracy contract "
                f"({c.text()}): at best {c.metric} = {best['value']:.6g} ({best['setting']}, "
                f"{100 * best['fraction']:.4g} % fixed, {best['extra_terms']} more terms) against the float model's "
                f"{ref:.6g} on the guard data, after {len(tries) + len(undone)} tries (down to "
                f"{most}, {len({x for _, x, _ in ladder}) - 1} smaller steps, "
                f"{max((e for _, _, e in ladder), default=0)} more power-of-two terms). The model is left as it was "
                f"before this round ({100 * self._fixed_count() / n:.4g} % fixed, within the contract). To go on: "
                f"{self.method_impl.contract_tip()}, or allow a larger drop ({setting('contract.max_drop')}, now "
                f"{c.max_drop:g} {c.drop_type})")
        if extra:
            self.extra_terms = extra_before + extra
            log.info("%s round %d: fixing with %d more power-of-two terms per value (max_order %d)%s", self.method,
                     t + 1, extra, self.engine_config.max_order,
                     ", kept if the training after it keeps the contract" if target < 1.0 else "")
        if target != frac:  # the rest of this round's weights follow in an extra round, after training
            self.fractions.insert(t, target)
            self.schedule_index.insert(t, origin)
            log.info("%s round %d: the contract kept fixing only %.4g %% instead of %.4g %% (%s); the rest follows "
                     "in an extra round", self.method, t + 1, 100 * target, 100 * frac,
                     self.method_impl.caution_text())
        if snapshot is not None and target < 1.0:  # judged again after the training that follows
            if target != frac:  # a split: the redo ladder continues within this (now smaller) round
                ladder = [(lv, x, e) for lv, x, e in ladder if x <= target]
                position = ladder.index((level, target, extra))
            self._pending = {"snapshot": snapshot, "ladder": ladder, "position": position, "level": level,
                             "target": target, "extra": extra, "setting": self.method_impl.caution_text(),
                             "undone": undone, "before": before,
                             "fixed_state": self._model_state() if self.cfg.contract.undo_training else None}
        else:
            self.caution = level
            if extra:
                log.warning("%s round %d: the contract was kept only with %d more power-of-two terms per value: the "
                            "codebook is finer from here on (max_order %d)", self.method, t + 1, extra,
                            self.engine_config.max_order)
        value = tries[-1]["value"]
        record = {"reference": ref, "before": before, "value": value, "drop": c.drop(ref, value),
                  "se": tries[-1]["se"], "bound": tries[-1]["bound"],
                  "caution": level, "setting": self.method_impl.caution_text(), "split": target != frac,
                  "extra_terms": extra, "tries": tries}
        if undone:
            record["undone_after_training"] = undone
        return kept, record

    def _snapshot(self) -> dict[str, Any]:
        """What a round undone after its training restores: the model's state (weights, sigmas, buffers),
        the masks, every optimizer that stepped the model, the budget, the caution and the RNG."""
        return {"model": self._model_state(),
                "masks": self.view.mask_state(),
                "optimizers": [{"optimizer": opt, "state": copy.deepcopy(opt.state_dict())}
                               for opt in list(self._stepped)],
                "budget": None if self.budget is None else (self.budget.merged_weights,
                                                           list(self.budget.merges_per_round)),
                "fractions": (list(self.fractions), list(self.schedule_index)),
                "max_order": self.engine_config.max_order, "extra_terms": self.extra_terms,
                "rng": rng_state(), "steps": (self.steps_taken, self._steps_at_round)}

    def _model_state(self) -> dict[str, torch.Tensor]:
        """A copy of the model's state (weights, sigmas, buffers) that later training cannot change."""
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    @torch.no_grad()
    def _restore(self, snap: dict[str, Any]) -> None:
        self.model.load_state_dict(snap["model"])
        self.view.load_mask_state(snap["masks"], "snapshot")
        self._restore_optimizers(snap)
        if self.budget is not None and snap["budget"] is not None:
            self.budget.merged_weights, merges = snap["budget"]
            self.budget.merges_per_round = list(merges)
        self.fractions, self.schedule_index = (list(x) for x in snap["fractions"])
        self.engine_config = dataclasses.replace(self.engine_config, max_order=int(snap["max_order"]))
        self.extra_terms = int(snap["extra_terms"])
        set_rng_state(snap["rng"])
        self._refresh_active()
        self._extra = None

    def _restore_optimizers(self, snap: dict[str, Any]) -> None:
        """Every optimizer that stepped the model back to its state in ``snap`` (one first stepped after it: no
        state at all)."""
        known, unbound = set(), []
        for entry in snap["optimizers"]:
            if entry["optimizer"] is None:  # a snapshot that went through a checkpoint: its optimizers are new
                unbound.append(entry["state"])
                continue
            entry["optimizer"].load_state_dict(entry["state"])
            known.add(id(entry["optimizer"]))
        others = [opt for opt in list(self._stepped) if id(opt) not in known]
        if len(unbound) == 1 and len(others) == 1:  # the run's one optimizer, recreated on resume
            try:
                others[0].load_state_dict(unbound[0])
                others = []
            except (ValueError, KeyError):
                pass
        for opt in others:  # first stepped after the snapshot: back to no state at all
            opt.state.clear()
