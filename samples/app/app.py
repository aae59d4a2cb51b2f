"""Serve one export, with its adapters, text in and text out, without torch or transformers.

Requests come on stdin, one JSON object a line: {"prompt": "...", "adapter": "adapter-a"}
("adapter" may be left out on a merged export); each answer goes to stdout as one JSON line,
{"adapter": ..., "text": ...}. --client picks who runs the export: loraexport.runtime (numpy,
onnxruntime and tokenizers) or onnxruntime-genai (its own tokenizer and loop, og.Adapters).

    printf '{"prompt": "The capital of France is", "adapter": "adapter-a"}\\n' |
        python samples/app/app.py runs/example/served --client runtime
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


class RuntimeClient:
    """loraexport.runtime: greedy text up to the export's end ids, the adapter chosen per call."""

    def __init__(self, export: Path) -> None:
        from loraexport.runtime import OnnxModel

        self.model = OnnxModel(export)

    def answer(self, prompt: str, adapter: str | None, max_new_tokens: int) -> str:
        return self.model.generate_text(prompt, max_new_tokens, adapter=adapter)


class GenaiClient:
    """onnxruntime-genai: the folder as it is (genai_config.json), each adapter file loaded once
    into og.Adapters and made active per generator."""

    def __init__(self, export: Path) -> None:
        import onnxruntime_genai as og

        self.og = og
        self.model = og.Model(str(export))
        self.tokenizer = og.Tokenizer(self.model)
        self.adapters = og.Adapters(self.model)
        for path in sorted(export.glob("*.onnx_adapter")):
            self.adapters.load(str(path), path.name.removesuffix(".onnx_adapter"))

    def answer(self, prompt: str, adapter: str | None, max_new_tokens: int) -> str:
        ids = self.tokenizer.encode(prompt)
        params = self.og.GeneratorParams(self.model)
        params.set_search_options(do_sample=False, max_length=len(ids) + max_new_tokens)
        generator = self.og.Generator(self.model, params)
        if adapter is not None:
            generator.set_active_adapter(self.adapters, adapter)
        generator.append_tokens(ids)
        while not generator.is_done():
            generator.generate_next_token()
        new = generator.get_sequence(0)[len(ids) :]  # genai leaves the end token out
        return self.tokenizer.decode(new)


CLIENTS = {"runtime": RuntimeClient, "genai": GenaiClient}


def serve(client, lines, out, max_new_tokens: int) -> None:
    """One answer per request line; a request that cannot be served gets {"error": ...}."""
    for line in lines:
        if not line.strip():
            continue
        request = json.loads(line)
        adapter = request.get("adapter")
        try:
            answer = {"adapter": adapter, "text": client.answer(request["prompt"], adapter, max_new_tokens)}
        except (ValueError, RuntimeError) as e:  # loraexport's RuntimeInputError is a ValueError
            answer = {"adapter": adapter, "error": str(e).splitlines()[0]}
        out.write(json.dumps(answer) + "\n")
        out.flush()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("export", type=Path, help="a loraexport output folder")
    parser.add_argument("--client", choices=sorted(CLIENTS), default="runtime")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    args = parser.parse_args(argv)
    serve(CLIENTS[args.client](args.export), sys.stdin, sys.stdout, args.max_new_tokens)


if __name__ == "__main__":
    main()
