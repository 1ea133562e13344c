"""`python -m zoodip.gpu_check`: the GPU check's command on a node without console scripts (offline installs, a
bare PYTHONPATH), kept at this short path; the check itself is zoodip/tools/gpu_check.py (zoodip-gpu-check)."""

from zoodip.tools.gpu_check import main

if __name__ == "__main__":
    main()
