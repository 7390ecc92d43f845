"""The machine a benchmark ran on, for every tool that prints figures."""
import os
import platform

VECTOR_FLAGS = ("avx", "avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile")


def cpu_info(cpuinfo_path="/proc/cpuinfo"):
    """(CPU model name, set of CPU flags) of this machine, from /proc/cpuinfo where there is one."""
    model, cpu_flags = platform.processor() or platform.machine(), set()
    try:
        with open(cpuinfo_path) as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    model = value.strip()
                elif key.strip() == "flags":
                    cpu_flags = set(value.split())
    except OSError:
        pass
    return model, cpu_flags


def describe():
    """`CPU model (its vector flags), N logical CPUs, platform`."""
    model, cpu_flags = cpu_info()
    vector = " ".join(flag for flag in VECTOR_FLAGS if flag in cpu_flags)
    return f"{model} ({vector}), {os.cpu_count()} logical CPUs, {platform.platform()}"
