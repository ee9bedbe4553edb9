"""Offsite emulators: compressed stand-ins of the backbone with trainable adapters.

Offsite-Tuning (Xiao, Lin, Han 2023): the coordinator keeps the backbone and ships a signed
package holding the first/last k blocks (the trainable adapter) and a compressed middle.

- `emulator.layers`   LayerMap, make_layer_map: which blocks are adapter, kept middle, dropped;
                      fill "share" keeps the depth (each dropped slot runs its nearest kept block)
- `emulator.build`    build_emulator, quantize_middle, adapter_state, load_adapter_state,
                      plug_in, attach_adapter_lora
- `emulator.distill`  distill_middle: train the kept middle toward the backbone (KL or hidden MSE)
- `emulator.quantize` blockwise int8 / NF4 storage of the frozen middle
- `emulator.package`  write_package, verify_package, load_package, PackageError (+ keys)
- `emulator.refresh`  signed low-rank refreshes of the frozen middle (per-round alignment)
- `emulator.cli`      build_command, verify_command behind `fedsite emulator build|verify`
"""
