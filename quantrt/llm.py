"""The offline API: load a model once, generate for many prompts in one batched run.

    from quantrt import LLM, SamplingParams
    llm = LLM("demo")
    out = llm.generate(["The capital of France is"], SamplingParams(temperature=0))
    print(out[0].outputs[0].text)
"""
from __future__ import annotations

import os
from typing import Any

from quantrt.engine.inputs import many_prompts, params_for
from quantrt.engine.llm_engine import EngineConfig, LLMEngine
from quantrt.engine.outputs import RequestOutput, request_output
from quantrt.engine.sequence import SamplingParams, Sequence
from quantrt.errors import ConfigError
from quantrt.loader import LoadedModel, load


class LLM:
    """A loaded model and its engine.

    ``source`` is anything ``quantrt.load`` takes, or an already loaded model.  Extra
    keyword arguments are engine options (``EngineConfig`` fields: ``block_size``,
    ``max_num_seqs``, ``kv_cache_memory``, ``enable_prefix_caching`` ...).
    """

    def __init__(self, source: str | os.PathLike | LoadedModel, quantization: str | None = None, *,
                 device: Any = None, dtype: Any = None, kernels: str = "auto",
                 progress: bool | None = None, **engine_options: Any) -> None:
        config = EngineConfig.from_options(**engine_options)   # before the slow load
        if isinstance(source, LoadedModel):
            if quantization is not None or device is not None or dtype is not None \
                    or kernels != "auto":
                raise ConfigError("quantization, device, dtype and kernels apply when loading; "
                                  "this model is already loaded")
            if config.tensor_parallel_size > 1:
                raise ConfigError("tensor_parallel_size > 1 loads the model on every rank: "
                                  "pass its source, not a loaded model")
            lm = source
            executor = None
        elif config.tensor_parallel_size > 1:
            from quantrt.parallel.launch import load_parallel

            lm, executor = load_parallel(source, quantization, config.tensor_parallel_size,
                                         device=device, dtype=dtype, kernels=kernels,
                                         progress=progress)
        else:
            lm = load(source, quantization, device=device, dtype=dtype, kernels=kernels,
                      progress=progress)
            executor = None
        try:
            self.engine = LLMEngine(lm, config, executor)
        except BaseException:
            if executor is not None:
                executor.shutdown()
            raise

    def shutdown(self) -> None:
        """Stop the tensor-parallel workers, if any (also done when the process exits)."""
        self.engine.shutdown()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    def generate(self, prompts: Any, params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = False) -> list[RequestOutput]:
        """Complete each prompt (a string or a list of token ids, or a list of those);
        results in the order of the prompts."""
        items = many_prompts(self.tokenizer, prompts)
        plist = params_for(params, len(items))
        for (_, ids), sp in zip(items, plist):     # refuse before queueing any
            self.engine.check_request(ids, sp)
        firsts = [self.engine.add_request(ids, sp, stream_text=False)
                  for (_, ids), sp in zip(items, plist)]
        try:
            self._run(firsts, use_tqdm)
        finally:
            for seq in firsts:                     # interrupted: leave the engine clean
                self.engine.abort(seq)
        return [request_output(seq.group, text) for seq, (text, _) in zip(firsts, items)]

    def chat(self, messages: list[dict] | list[list[dict]],
             params: SamplingParams | list[SamplingParams] | None = None, use_tqdm: bool = False,
             add_generation_prompt: bool = True, **template_kwargs: Any) -> list[RequestOutput]:
        """Reply to one conversation (a list of {"role", "content"} dicts) or to each of a
        list of them, through the model's chat template."""
        if isinstance(messages, (list, tuple)) and messages and all(
                isinstance(m, (list, tuple)) for m in messages):
            conversations = list(messages)
        else:
            conversations = [messages]
        prompts = [self.tokenizer.apply_chat_template(c, add_generation_prompt=add_generation_prompt,
                                                      tokenize=True, **template_kwargs)
                   for c in conversations]
        return self.generate(prompts, params, use_tqdm)

    def _run(self, firsts: list[Sequence], use_tqdm: bool) -> None:
        pending = {seq.request_id for seq in firsts}
        bar = None
        if use_tqdm:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(pending), desc="generating", unit="req")
        try:
            while pending:
                self.engine.step()
                done = {rid for rid in pending if rid not in self.engine.requests}
                pending -= done
                if bar is not None and done:
                    bar.update(len(done))
        finally:
            if bar is not None:
                bar.close()
