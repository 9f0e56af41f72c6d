"""GPU run of the detection story used for RESULTS.md: train the shapes preset, evaluate per k and forced
expert, analyse size specialisation, and copy the results to $OUT.

    OUT=/tmp/out python3 benchmarks/detection_gpu_runs.py NAME [key=value ...]
"""
import json, os, sys, time, shutil
sys.path.insert(0, "src")
from omegaconf import OmegaConf
from moecnn.train.detection import load_detection_config, train_detection, evaluate_detection
from moecnn.analysis.detection import analyze_detection
out = os.environ["OUT"]
name = sys.argv[1]
over = OmegaConf.from_dotlist(sys.argv[2:])
cfg = load_detection_config("src/moecnn/configs/detection_shapes.yaml", {
    "data": {"shapes": {"out": "/tmp/shapes"}, "num_workers": 6},
    "optim": {"bf16": True}, "log": {"eval_every": 0, "print_every": 0}}, over)
t = time.time()
final = train_detection(cfg, f"/tmp/{name}")
print(name, "train", round(time.time() - t), json.dumps({k: final[k] for k in ("AP", "AP50", "AP_S", "AP_M", "AP_L", "images_per_s")}))
if cfg.model.moe_heads != "none":
    ev = evaluate_detection(f"/tmp/{name}")
    print(name, "k", {k: round(v["AP"], 4) for k, v in ev["k"].items()}, "forced", {k: round(v["AP"], 4) for k, v in ev["forced"].items()})
    s = analyze_detection(f"/tmp/{name}")
    for key, h in s["heads"].items():
        print(name, key, "bucket p %.3g V %.2f" % (h["bucket_test"]["p_value"], h["bucket_test"]["cramers_v"]),
              "within", {l: "%.3g" % t["p_value"] for l, t in h["bucket_test_within_level"].items()})
        print(name, key, {b: [round(x, 2) for x in v["top1_share"]] for b, v in h["by_bucket"].items()})
    for f in ["eval/detection_eval.json", "analysis/detection_summary.json", "analysis/detection_usage.png"]:
        shutil.copy(f"/tmp/{name}/{f}", os.path.join(out, name + "_" + f.replace("/", "_")))
shutil.copy(f"/tmp/{name}/final.json", os.path.join(out, name + "_final.json"))
