"""Device equations: cell levels to conductances, and the effects of programming them.

Applied once per programmed tile and Monte-Carlo trial, from an explicit random generator:
    G = g_off + L / L_max * (g_on - g_off)          (level L of L_max + 1 levels)
    lognormal variation:  G * exp(sigma * n)          n ~ N(0, 1), median at the target
    gaussian variation:   G * (1 + sigma * n), clipped at 0
    stuck-at-off / stuck-at-on: a random fraction of cells read g_off / g_on whatever was written.
"""

from __future__ import annotations

import numpy as np

from xcompile.config import Hardware


def level_conductance(levels: np.ndarray, level_max: float, hw: Hardware) -> np.ndarray:
    """Target conductance (S) of each cell for its level."""
    return hw.g_off + np.asarray(levels, dtype=np.float64) * ((hw.g_on - hw.g_off) / level_max)


def program(levels: np.ndarray, level_max: float, hw: Hardware, rng: np.random.Generator) -> np.ndarray:
    """Conductances actually programmed (float64, same shape as `levels`), for one trial."""
    return perturb(level_conductance(levels, level_max, hw), hw, rng)


def perturb(g: np.ndarray, hw: Hardware, rng: np.random.Generator) -> np.ndarray:
    """What programming target conductances `g` (S) actually gives, for one trial: variation,
    then stuck cells (the draws `program` makes)."""
    if hw.sigma > 0:
        noise = rng.standard_normal(g.shape)
        if hw.variation == "lognormal":
            g = g * np.exp(hw.sigma * noise)
        else:
            g = np.maximum(g * (1.0 + hw.sigma * noise), 0.0)
    if hw.stuck_off_rate > 0 or hw.stuck_on_rate > 0:
        draw = rng.random(g.shape)
        g = np.where(draw < hw.stuck_off_rate, hw.g_off, g)
        g = np.where((draw >= hw.stuck_off_rate) & (draw < hw.stuck_off_rate + hw.stuck_on_rate), hw.g_on, g)
    return g
