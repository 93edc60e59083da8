"""README's PyTorch DistributedDataParallel example: 2 processes vs 1.

Spawned by `nha_distribution_test.py`. Writes the README code to a temporary
file, runs it with `torch.distributed.run` on 2 and on 1 CPU processes
(gloo), and prints both loss lists as JSON after `RESULT `.
"""

import ast
import json
import os
import subprocess
import sys
import tempfile


def losses(script, processes):
    env = dict(os.environ, KERAS_BACKEND="torch", OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone",
         f"--nproc_per_node={processes}", script],
        env=env, capture_output=True, text=True, timeout=600)
    for line in result.stdout.splitlines():
        if line.startswith("losses "):
            return ast.literal_eval(line[len("losses "):])
    raise RuntimeError(result.stdout[-2000:] + result.stderr[-4000:])


def main():
    readme = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                          os.pardir, os.pardir, "README.md")
    section = open(readme).read().split("## Training on several devices")[1]
    code = section.split("```python\n")[3].split("```", 1)[0]
    with tempfile.TemporaryDirectory() as folder:
        script = os.path.join(folder, "train.py")
        with open(script, "w") as f:
            f.write(code)
        print("RESULT " + json.dumps({"two_processes": losses(script, 2),
                                      "one_process": losses(script, 1)}))


if __name__ == "__main__":
    main()
