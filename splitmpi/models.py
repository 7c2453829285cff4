"""Networks cut into the three parts of split learning: extractor | cloud | classifier.

One rule cuts every network, the built-in cnn5, torchvision's and a user's (``split``):
trace its forward with torch.fx, keeping every module whole except those on the way to
the cut and to the output layer; the extractor is the graph up to the cut module's output,
the classifier is the output layer (the network's final ``nn.Linear``), the cloud is what
lies between. A module is a legal cut when its output is the only tensor alive after it:
the one activation that crosses the network. The parts keep the network's own parameter
names (``layer3.0.conv1.weight``), so their state dicts together are the network's.

Every rank builds the whole network from the same seed and keeps its own parts, so all
clients start from one common extractor and the server's cloud matches it.
"""
from __future__ import annotations

import difflib
import logging
import math
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import fx, nn

from . import population
from .config import Config, ModelConfig, TrainConfig, user_function
from .data import spec
from .errors import ConfigError

log = logging.getLogger(__name__)

PAPER_CUTS = {"resnet50": ("layer1", "layer2", "layer3"), "cnn5": (0, 1, 2, 3, 4)}
"""The cuts the papers sweep (jobs and benchmarks vary these)."""
CNN5_FILTERS = (16, 32, 64, 128, 256)
SMALL_IMAGE = 64  # below this, ResNets take the small-image stem
INPUT = ""  # the cut before the first layer: the clients send their inputs (cnn5's cut 0)


@dataclass
class SplitModel:
    extractor: nn.Module  # client: input .. cut
    cloud: nn.Module  # server: cut .. the output layer's input
    classifier: nn.Module  # client (u_shape) or server (label_sharing): the output layer


@dataclass(frozen=True)
class Cut:
    """A legal cut, as ``--list-cuts`` prints it."""

    name: str
    aliases: tuple[str, ...]  # inner modules ending at the same tensor
    shape: tuple[int, ...]  # the activation of one sample
    params: tuple[int, int, int]  # extractor, cloud, classifier

    @property
    def bytes(self) -> int:
        """Bytes per sample crossing the network each way, in float32."""
        return 4 * math.prod(self.shape)


# --- the networks --------------------------------------------------------------------------

def build(cfg: ModelConfig, channels: int, image_size: int, num_classes: int,
          seed: int) -> SplitModel:
    """The network ``cfg`` names, from ``seed`` (and ``cfg.weights``), cut at ``cfg.cut``."""
    torch.manual_seed(seed)
    made = network(cfg, channels, image_size, num_classes)
    checkpoint = bool(cfg.weights) and Path(cfg.weights).is_dir()
    if isinstance(made, SplitModel):
        if cfg.weights and not checkpoint:
            raise ConfigError(f"model.weights={cfg.weights}: {cfg.arch} returns its three "
                              "parts, which load weights from a splitmpi checkpoint folder "
                              "only", "name an epoch-NNNNN folder, or return one module "
                              "from the function to load a state dict file")
        parts = made
    else:
        net, cut = made
        check_image_size(net, cfg.arch, channels, image_size)
        if cfg.weights and not checkpoint:
            load_weights(net, cfg)
        parts = split(net, cut, cfg.arch)
    if checkpoint:
        load_checkpoint_parts(parts, Path(cfg.weights))
    return parts


def for_run(cfg: Config) -> SplitModel:
    """The run's network, sized by its data set, from the run's seed (same on every rank)."""
    shape = spec(cfg.data)
    return build(cfg.model, shape.channels, shape.image_size, shape.num_classes,
                 cfg.train.seed)


def network(cfg: ModelConfig, channels: int, image_size: int,
            num_classes: int) -> tuple[nn.Module, str] | SplitModel:
    """The whole network and its cut's module name, or a user's three parts as they are."""
    if cfg.arch == "cnn5":
        return _cnn5(cfg.cut, channels, image_size, num_classes), _cnn5_cut(cfg.cut)
    if ":" in cfg.arch:
        return _user(cfg, channels, image_size, num_classes)
    return _torchvision(cfg.arch, channels, image_size, num_classes), str(cfg.cut)


def _cnn5_cut(cut: int | str) -> str:
    """cnn5's cut k puts its first k blocks, the modules named "1".."k", on the client."""
    return INPUT if str(cut) == "0" else str(cut)


def _cnn5(cut: int | str, channels: int, image_size: int, num_classes: int) -> nn.Sequential:
    """The spatio-temporal paper's CNN: five Conv2D(3x3)+ReLU+MaxPool blocks ("1".."5"),
    Dense 512, Dense classes. ``ceil_mode`` pooling lets 28 px inputs through all five
    blocks. The blocks from the cut on are initialised twice, as 0.1 did, so that a seed
    gives the network it gave then (whatever the cut: the draws depend on it)."""
    cut = int(cut) if str(cut).isdigit() else len(CNN5_FILTERS)
    blocks, width, size = [], channels, image_size
    for filters in CNN5_FILTERS:
        blocks.append(nn.Sequential(nn.Conv2d(width, filters, 3, padding=1), nn.ReLU(),
                                    nn.MaxPool2d(2, ceil_mode=True)))
        width, size = filters, -(-size // 2)
    dense, head = nn.Linear(width * size * size, 512), nn.Linear(512, num_classes)
    for layer in [*blocks, *blocks[cut:], dense, head]:
        layer.apply(_he_init)
    named = [(str(k), block) for k, block in enumerate(blocks, 1)]
    return nn.Sequential(OrderedDict([*named, ("flatten", nn.Flatten()), ("dense", dense),
                                      ("relu", nn.ReLU()), ("head", head)]))


def _he_init(layer: nn.Module) -> None:
    """He init: with PyTorch's default, five plain ReLU blocks start on a long plateau."""
    if isinstance(layer, (nn.Conv2d, nn.Linear)):
        nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
        nn.init.zeros_(layer.bias)


def architectures() -> list[str]:
    """Every name ``model.arch`` takes besides ``package.module:function``."""
    from torchvision import models
    return ["cnn5", *models.list_models(module=models)]


def _torchvision(arch: str, channels: int, image_size: int, num_classes: int) -> nn.Module:
    """torchvision's classification model ``arch``, untrained, sized to the data: the
    output layer to its classes, the first convolution to its channels; ResNets take the
    small-image stem under 64 px (3x3 stride-1 conv, no max-pool), vision transformers
    the data's image size. torchvision is imported here, not at the top: it costs every
    rank 1.5 s of start-up and 170 MB, which cnn5 runs need not pay."""
    from torchvision import models
    if arch not in models.list_models(module=models):
        close = difflib.get_close_matches(arch, architectures(), n=3)
        raise ConfigError(f"model.arch={arch!r} is not a torchvision classification model "
                          "nor cnn5" + (f" (did you mean {' or '.join(close)}?)" if close else ""),
                          "use cnn5, a name torchvision.models.list_models() gives, or your "
                          "own network as model.arch=package.module:function")
    try:
        return _sized(arch, channels, image_size, num_classes)
    except (AssertionError, ValueError, RuntimeError) as exc:
        raise ConfigError(f"model.arch={arch} cannot be built for {image_size} px images "
                          f"({str(exc).splitlines()[0]})", _size_fix(arch, channels)) from None


def _sized(arch: str, channels: int, image_size: int, num_classes: int) -> nn.Module:
    from torchvision import models
    kwargs = {}
    if arch in ("googlenet", "inception_v3"):
        kwargs = {"aux_logits": False, "init_weights": True}
    elif arch.startswith("vit_"):
        kwargs = {"image_size": image_size}
    elif arch.startswith("maxvit"):
        kwargs = {"input_size": (image_size, image_size)}
    net = models.get_model(arch, weights=None, num_classes=num_classes, **kwargs)
    if isinstance(net, models.ResNet) and image_size < SMALL_IMAGE:
        net.conv1 = nn.Conv2d(channels, net.conv1.out_channels, kernel_size=3, stride=1,
                              padding=1, bias=False)
        net.maxpool = nn.Identity()
    elif channels != 3:
        _first_convolution_for(net, channels)
    return net


def _first_convolution_for(net: nn.Module, channels: int) -> None:
    """Rebuild the network's first convolution, as it was but for ``channels`` inputs."""
    name, conv = next((n, m) for n, m in net.named_modules() if isinstance(m, nn.Conv2d))
    parent, _, attr = name.rpartition(".")
    setattr(net.get_submodule(parent), attr, nn.Conv2d(
        channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
        conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode))


def _size_fix(arch: str, channels: int) -> str:
    smallest = _smallest_size(arch, channels) if ":" not in arch else None
    return (f"set data.image_size={smallest} (the smallest of 32, 64, .. 224 px that {arch} "
            "takes)" if smallest else "set data.image_size to a size the network takes, e.g. 224")


def check_image_size(net: nn.Module, arch: str, channels: int, image_size: int) -> None:
    """Fail before any work if a batch of this size cannot pass through the network."""
    try:
        shapes(net, (channels, image_size, image_size))
    except (RuntimeError, ValueError, AssertionError, IndexError) as exc:
        raise ConfigError(f"model.arch={arch} cannot take {image_size} px images "
                          f"({str(exc).splitlines()[0][:160]})",
                          _size_fix(arch, channels)) from None


def _user(cfg: ModelConfig, channels: int, image_size: int,
          num_classes: int) -> tuple[nn.Module, str] | SplitModel:
    """A user's network: ``function(num_classes=, channels=, image_size=)`` returns the
    three parts, or one module (cut at ``model.cut``), or one module and its cut."""
    function = user_function("model.arch", cfg.arch,
                             "(num_classes, channels, image_size)")
    try:
        made = function(num_classes=num_classes, channels=channels, image_size=image_size)
    except Exception as exc:  # the user's code may fail in any way
        raise ConfigError(f"model.arch={cfg.arch} failed: {type(exc).__name__}: {exc}",
                          "fix the function; it is called as function(num_classes=N, "
                          "channels=C, image_size=S)") from None
    if isinstance(made, nn.Module):
        return made, str(cfg.cut)
    if isinstance(made, tuple) and len(made) == 3 and all(
            isinstance(m, nn.Module) for m in made):
        return SplitModel(*made)
    if (isinstance(made, tuple) and len(made) == 2 and isinstance(made[0], nn.Module)
            and isinstance(made[1], str)):
        return made
    raise ConfigError(f"model.arch={cfg.arch} returned {type(made).__name__}, not a network",
                      "return an nn.Module, (nn.Module, cut name) or the three modules "
                      "(extractor, cloud, classifier)")


# --- the rule ------------------------------------------------------------------------------

class _Tracer(fx.Tracer):
    """Traces into the root and the modules in ``opened``; every other module is one call,
    so its forward (train/eval branches included) runs as written."""

    def __init__(self, opened: set[str]):
        super().__init__()
        self.opened = opened

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return qualname not in self.opened


def _trace(net: nn.Module, arch: str, tracer: fx.Tracer | None = None) -> fx.Graph:
    try:
        return (tracer or fx.Tracer()).trace(net)
    except Exception as exc:  # fx fails on data-dependent Python in many ways
        raise ConfigError(f"model.arch={arch}: torch.fx cannot trace the network "
                          f"({type(exc).__name__}: {str(exc).splitlines()[0][:160]})",
                          "return its three parts (extractor, cloud, classifier) from a "
                          "model.arch=package.module:function instead") from None


def _ancestors(name: str) -> set[str]:
    parts = name.split(".")
    return {".".join(parts[:k]) for k in range(1, len(parts))}


def _calls(nodes: list[fx.Node], target: str) -> list[fx.Node]:
    return [n for n in nodes if n.op == "call_module" and n.target == target]


def _output_layer(nodes: list[fx.Node], net: nn.Module, arch: str) -> str:
    """The name of the module that computes the network's output: a ``nn.Linear``."""
    result = nodes[-1].args[0]
    if not (isinstance(result, fx.Node) and result.op == "call_module"
            and isinstance(net.get_submodule(result.target), nn.Linear)):
        raise ConfigError(f"model.arch={arch}: the network's output is not computed by a "
                          "final nn.Linear, which splitmpi keeps as the output layer",
                          "use a network that ends in nn.Linear, or return its three parts "
                          "from a model.arch=package.module:function")
    return result.target


def _alive_after(nodes: list[fx.Node], where: dict, position: int) -> list[fx.Node]:
    """The values computed at or before ``position`` and used after it."""
    return [n for n in nodes[:position + 1] if any(where[u] > position for u in n.users)]


def split(net: nn.Module, cut: str, arch: str = "the network") -> SplitModel:
    """``net`` cut after module ``cut`` (``INPUT``: before its first layer)."""
    full = list(_trace(net, arch).nodes)
    head = _output_layer(full, net, arch)
    if cut != INPUT and cut not in dict(net.named_modules()):
        raise ConfigError(f"model.cut={cut!r} is not a module of {arch}", _cuts_fix(net, arch))
    opened, was = _ancestors(cut) | _ancestors(head), net.training
    graphs = []
    for mode in (True, False):
        net.train(mode)
        graphs.append(_trace(net, arch, _Tracer(opened)))
    net.train(was)
    if graphs[0].python_code("self").src != graphs[1].python_code("self").src:
        raise ConfigError(f"model.cut={cut}: the forward around it takes another path in "
                          "evaluation than in training, so it cannot be cut there",
                          _cuts_fix(net, arch))
    nodes = list(graphs[0].nodes)
    where = {n: i for i, n in enumerate(nodes)}
    calls = _calls(nodes, cut) if cut != INPUT else [nodes[0]]
    if len(calls) != 1:
        raise ConfigError(f"model.cut={cut} is called {len(calls)} times in {arch}'s forward, "
                          "not once", _cuts_fix(net, arch))
    at, end = where[calls[0]], where[_calls(nodes, head)[0]]
    alive = _alive_after(nodes, where, at)
    if alive != [calls[0]] or at >= end - 1:
        raise ConfigError(f"model.cut={cut} is not a cut of {arch}: "
                          + (f"{len(alive)} tensors are alive after it, not one"
                             if alive != [calls[0]] else "nothing is left for the server"),
                          _cuts_fix(net, arch))
    features = nodes[end].args[0]
    if _alive_after(nodes, where, end - 1) != [features]:
        raise ConfigError(f"model.arch={arch}: more than the features reach the output layer "
                          f"{head}", "return the network's three parts from a "
                          "model.arch=package.module:function")
    parts = SplitModel(_part(net, graphs[0], nodes[1:at + 1], nodes[0], calls[0], "Extractor"),
                       _part(net, graphs[0], nodes[at + 1:end], calls[0], features, "Cloud"),
                       _part(net, graphs[0], [nodes[end]], features, nodes[end], "Classifier"))
    if not has_parameters(parts.cloud):
        raise ConfigError(f"model.cut={cut} leaves the server no layer to train",
                          _cuts_fix(net, arch))
    return parts


def _part(net: nn.Module, graph: fx.Graph, nodes: list[fx.Node], start: fx.Node,
          end: fx.Node, name: str) -> fx.GraphModule:
    """The nodes from ``start`` (exclusive, the input) to ``end`` as a module of their own,
    sharing ``net``'s submodules (same names, same parameters)."""
    part = fx.Graph()
    env = {start: part.placeholder("x")}
    for node in nodes:
        env[node] = part.node_copy(node, lambda n: env[n])
    part.output(env[end])
    return fx.GraphModule(net, part, class_name=name)


def cuts(net: nn.Module, arch: str, channels: int = 0, image_size: int = 0) -> list[Cut]:
    """Every legal cut of ``net`` in forward order: modules called once whose output is
    the only tensor alive after them, with a trainable layer left for the server. The
    shapes need the images' ``channels`` and ``image_size`` (empty without)."""
    nodes = list(_trace(net, arch).nodes)
    head = _output_layer(nodes, net, arch)
    sizes = shapes(net, (channels, image_size, image_size)) if channels else {}
    where = {n: i for i, n in enumerate(nodes)}
    last_use = [max((where[u] for u in n.users), default=i) for i, n in enumerate(nodes)]
    # alive[i]: values computed at or before node i and used after it
    opened, alive = [0] * (len(nodes) + 1), []
    for i, used in enumerate(last_use):
        if used > i:
            opened[i] += 1
            opened[used] -= 1
        alive.append((alive[-1] if alive else 0) + opened[i])
    ends, repeated = {}, set()
    for i, node in enumerate(nodes):
        for key, (name, _) in (node.meta.get("nn_module_stack") or {}).items():
            repeated |= {name} if "@" in key else set()
            ends[name] = i
    owned = _parameters_by_node(net, nodes)
    end = where[_calls(nodes, head)[0]]
    found: dict[int, list[str]] = {}
    for name, i in ends.items():
        if (name not in repeated and i < end and alive[i] == 1 and last_use[i] > i
                and sum(owned[i + 1:end])):
            found.setdefault(i, []).append(name)
    result = []
    for i, names in sorted(found.items()):
        names = sorted(names, key=lambda n: (n.count("."), n))
        result.append(Cut(names[0], tuple(names[1:]), sizes.get(nodes[i].name, ()),
                          (sum(owned[:i + 1]), sum(owned[i + 1:end]), owned[end])))
    return result


def _parameters_by_node(net: nn.Module, nodes: list[fx.Node]) -> list[int]:
    """Parameters each node brings in first (a module's, or a parameter it reads)."""
    seen, counts = set(), []
    for node in nodes:
        if node.op == "call_module":
            params = list(net.get_submodule(node.target).parameters())
        elif node.op == "get_attr" and isinstance(obj := _attr(net, node.target), nn.Parameter):
            params = [obj]
        else:
            params = []
        fresh = [p for p in params if id(p) not in seen]
        seen |= {id(p) for p in fresh}
        counts.append(sum(p.numel() for p in fresh))
    return counts


def _attr(net: nn.Module, target: str):
    owner, _, name = target.rpartition(".")
    return getattr(net.get_submodule(owner), name)


def shapes(net: nn.Module, sample: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
    """One sample's shape at every tensor node of the module's fx graph, in forward order,
    from a zero batch of ``sample``-shaped inputs run in evaluation mode (which changes no
    weight, statistic or random state)."""
    mode, found = net.training, {}

    class Shapes(fx.Interpreter):
        def run_node(self, node):
            result = super().run_node(node)
            if isinstance(result, torch.Tensor):
                found[node.name] = tuple(result.shape[1:])
            return result

    device = next(net.parameters(), torch.zeros(0)).device
    try:
        net.eval()  # before tracing: a traced-through module may read the mode
        graph = fx.GraphModule(net, _trace(net, "the network"))
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            Shapes(graph).run(torch.zeros(1, *sample, device=device))
    finally:
        net.train(mode)
    return found


def _smallest_size(arch: str, channels: int) -> int | None:
    """The smallest of 32, 64, .. 224 px that torchvision's ``arch`` takes (None: none of
    them, or the network cannot be sized without real weights)."""
    for size in range(32, 225, 32):
        try:
            with torch.device("meta"):
                shapes(_sized(arch, channels, size, 10), (channels, size, size))
            return size
        except Exception:  # noqa: BLE001 - any failure means: not this size
            continue
    return None


def _cuts_fix(net: nn.Module, arch: str) -> str:
    names = [c.name for c in cuts(net, arch)]
    shown = ", ".join(names[:24]) + (f", ... ({len(names)} in all)" if len(names) > 24 else "")
    return (f"use one of: {shown}; python -m splitmpi --list-cuts model.arch={arch} "
            "shows what crosses the network at each")


# --- weights ---------------------------------------------------------------------------------

def load_weights(net: nn.Module, cfg: ModelConfig) -> None:
    """A torchvision-style state dict file into the whole network. Its names must be the
    network's; only the tensors the data resized (first convolution, output layer) may
    differ in shape, and stay as initialised."""
    path = Path(cfg.weights)
    if not path.is_file():
        raise ConfigError(f"model.weights={cfg.weights} is not a file", _weights_fix(cfg))
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch.load raises many types on foreign files
        raise ConfigError(f"model.weights={cfg.weights} is not a readable state dict "
                          f"({type(exc).__name__}: {str(exc)[:120]})",
                          "save one with torch.save(model.state_dict(), PATH)") from None
    own = net.state_dict()
    if not isinstance(saved, dict) or set(saved) != set(own):
        missing = sorted(set(own) - set(saved or {}))[:3]
        raise ConfigError(f"model.weights={cfg.weights} does not hold {cfg.arch}'s tensors"
                          + (f" (missing e.g. {', '.join(missing)})" if missing else ""),
                          "give the state dict of the same architecture")
    resized = [k for k in own if saved[k].shape != own[k].shape]
    first = next(n for n, m in net.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    output = _output_layer(list(_trace(net, cfg.arch).nodes), net, cfg.arch)
    wrong = [k for k in resized if k.rpartition(".")[0] not in (first, output)]
    if wrong:
        raise ConfigError(f"model.weights={cfg.weights}: {wrong[0]} has shape "
                          f"{tuple(saved[wrong[0]].shape)}, the network "
                          f"{tuple(own[wrong[0]].shape)}",
                          "give the state dict of the same architecture")
    net.load_state_dict({k: own[k] if k in resized else saved[k] for k in own})
    log.info(f"model.weights: {len(own) - len(resized)} tensors from {path}"
             + (f"; kept as initialised for this data: {', '.join(resized)}" if resized else ""))


def _weights_fix(cfg: ModelConfig) -> str:
    """Where a pretrained torchvision file comes from: splitmpi downloads nothing."""
    try:
        from torchvision import models
        weights = models.get_model_weights(cfg.arch)
        entry = weights[cfg.weights] if cfg.weights in weights.__members__ else weights.DEFAULT
        return (f"splitmpi downloads nothing: fetch {entry.url} on a machine with internet, "
                f"copy it here and set model.weights=/path/to/{entry.url.rsplit('/', 1)[-1]}")
    except (ValueError, KeyError, AttributeError, ImportError):
        return "set model.weights to an existing state dict file or checkpoint folder"


def load_checkpoint_parts(parts: SplitModel, folder: Path) -> None:
    """A splitmpi checkpoint set's network: the server's cloud (and output layer, in
    label_sharing) and client 1's extractor (and classifier, in u_shape)."""
    try:
        server = torch.load(folder / "rank-0.pt", map_location="cpu", weights_only=True)
        states = server["state"], population.saved_client(folder, 1)
    except Exception as exc:  # a folder of anything else
        raise ConfigError(f"model.weights={folder} is not a splitmpi checkpoint set "
                          f"({type(exc).__name__}: {str(exc)[:120]})",
                          "name an epoch-NNNNN folder holding rank-0.pt and rank-1.pt") from None
    classifier = states[1]["classifier"] or states[0]["head"]
    for module, state, what in ((parts.extractor, states[1]["extractor"], "extractor"),
                                (parts.cloud, states[0]["cloud"], "cloud"),
                                (parts.classifier, classifier, "classifier")):
        try:
            load_part(module, state)
        except RuntimeError as exc:
            raise ConfigError(f"model.weights={folder}: its {what} does not fit this "
                              f"network ({str(exc).splitlines()[0][:160]})",
                              "use a checkpoint of the same model.arch and model.cut") from None


def load_part(module: nn.Module, state: dict) -> None:
    """``module.load_state_dict(state)``; a state whose names differ but whose tensors
    match in order and shape (checkpoints of 0.1 and 0.2.0.dev0 named the parts' layers
    by position) loads by position."""
    own = module.state_dict()
    if set(state) != set(own) and len(state) == len(own) and all(
            a.shape == b.shape for a, b in zip(state.values(), own.values())):
        state = dict(zip(own, state.values()))
    module.load_state_dict(state)


def sgd(modules: list[nn.Module | None], cfg: TrainConfig) -> torch.optim.SGD | None:
    """One SGD over the parameters of ``modules`` (None entries skipped); None if none."""
    params = [p for m in modules if m is not None for p in m.parameters()]
    return (torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum,
                            weight_decay=cfg.weight_decay) if params else None)


def has_parameters(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())
