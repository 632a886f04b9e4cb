rule tile_wsi:
    input:
        unpack(sample_annotations),
        unpack(rebuild_input("tile")),
        download="results/wsi/{sample}/download.json",
        preprocess="results/wsi/{sample}/preprocess.json",
    output:
        table="results/wsi/{sample}/tiles/tiles.parquet",
        overlay="results/wsi/{sample}/tiles/overlay.png",
        summary="results/wsi/{sample}/tiles/summary.json",
        patches="results/wsi/{sample}/tiles/{sample}_patches.h5",
        manifest="results/wsi/{sample}/tile.json",
    log:
        "logs/tile_wsi/{sample}.log",
    priority: 2
    retries: 2
    threads: cpu_threads(4)
    resources:
        mem_mb=mem_tile_wsi,
        disk_mb=disk_tile_wsi,
        disk_need_mb=disk_tile_wsi,
        runtime="2h",
    params:
        tile=config["wsi"]["tile"],
        engine=step_code("wsi", "tile_wsi"),
    run:
        CPU_STEPS.run(rule, input, output, params, wildcards, threads, resources, log)


rule tile_ct:
    input:
        unpack(sample_annotations),
        unpack(lidc_scan),
        unpack(rebuild_input("tile")),
        preprocess="results/ct/{sample}/preprocess.json",
    # patches.npy is a working file (a param, listed in the manifest), not an output.
    output:
        table="results/ct/{sample}/patches/patches.parquet",
        summary="results/ct/{sample}/patches/summary.json",
        manifest="results/ct/{sample}/tile.json",
    log:
        "logs/tile_ct/{sample}.log",
    priority: 2
    retries: 2
    threads: 1
    resources:
        mem_mb=mem_tile_ct,
        disk_mb=disk_tile_ct,
        disk_need_mb=disk_tile_ct,
        runtime="30m",
    params:
        patches="results/ct/{sample}/patches/patches.npy",
        settings=mw.settings_only(config["ct"], "patches", "slices_png", "normalise"),
        engine=step_code("ct", "tile_ct"),
    run:
        CPU_STEPS.run(rule, input, output, params, wildcards, threads, resources, log)
