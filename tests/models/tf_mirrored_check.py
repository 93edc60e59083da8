"""README's TensorFlow data-parallel example against one device.

Spawned by `nha_distribution_test.py` in a fresh process: TensorFlow's
logical devices must be set before it starts. Runs the README code
(`tf.distribute.MirroredStrategy` over 2 logical CPU devices), then the same
model and data on one device, and prints the losses as JSON after `RESULT `.
"""

import json
import os
import sys

os.environ["KERAS_BACKEND"] = "tensorflow"


def main():
    readme = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                          os.pardir, os.pardir, "README.md")
    section = open(readme).read().split("## Training on several devices")[1]
    code = section.split("```python\n")[2].split("```", 1)[0]
    namespace = {}
    exec(compile(code, "README.md", "exec"), namespace)
    keras, np = namespace["keras"], namespace["np"]
    tokens = namespace["tokens"]

    keras.utils.set_random_seed(0)
    single = namespace["NHACausalLM"](namespace["NHABackbone"].from_config(
        namespace["lm"].backbone.get_config()))
    single.compile(optimizer=keras.optimizers.SGD(0.1),
                   loss=keras.losses.SparseCategoricalCrossentropy(
                       from_logits=True))
    single_history = single.fit(
        {"token_ids": tokens[:, :-1],
         "padding_mask": np.ones((16, 16), "int32")},
        tokens[:, 1:], batch_size=8, epochs=2, shuffle=False, verbose=0)
    print("RESULT " + json.dumps({
        "replicas": namespace["strategy"].num_replicas_in_sync,
        "losses": namespace["history"].history["loss"],
        "single_losses": single_history.history["loss"]}))


if __name__ == "__main__":
    sys.exit(main())
