"""Capturing the FX graph that Dynamo hands a torch.compile backend."""
import torch


def captured_graph(model, ids):
    """(graph module, example inputs) of model(ids) under fullgraph Dynamo."""
    graphs = []

    def capture(gm, example_inputs):
        graphs.append((gm, list(example_inputs)))
        return gm

    torch._dynamo.reset()
    with torch.inference_mode():
        torch.compile(model, backend=capture, fullgraph=True)(ids)
    return graphs[0]
