"""The inference engine both node kinds run. `from engine import LLM, SamplingParams`."""

from engine.sampling_params import SamplingParams


def __getattr__(name: str):
    # LLM pulls in torch and the model code; import it only when asked for.
    if name == "LLM":
        from engine.llm import LLM
        return LLM
    if name in ("LLMEngine", "EngineClosedError"):
        import engine.llm_engine
        return getattr(engine.llm_engine, name)
    raise AttributeError(name)


__all__ = ["EngineClosedError", "LLM", "LLMEngine", "SamplingParams"]
