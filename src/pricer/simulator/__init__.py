"""A simulator of the three market-data providers of DESIGN §3.1 (a lender, a volatility index, an event
calendar) on one port, with faults switchable at run time: for tests, demos and benchmarks
(`pricer simulate-sources`). Nothing of the engine runs in it; it reads the data files with the engine's
parsers only.
"""

from __future__ import annotations

from pricer.simulator.app import SimulatorState, create_simulator_app
from pricer.simulator.data import load_provider_data

__all__ = ["SimulatorState", "create_simulator_app", "load_provider_data"]
