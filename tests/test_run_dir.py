"""The run directory's owner: paths, records and the one up-to-date check."""

from kore_ray.run_dir import RunDir, atomic_write, is_current, read_record, run_name, write_record


def test_paths_are_under_the_run_directory(tmp_path):
    run = RunDir(tmp_path / "r")
    paths = [run.conversations, run.failures, run.augment_summary, run.augment_cache,
             run.covariance, run.init("kore"), run.train("lora"), run.checkpoints,
             run.adapter("kore"), run.results, run.report, run.predictions, run.plot]
    assert all(p.is_relative_to(tmp_path / "r") for p in paths)
    assert len(set(paths)) == len(paths)
    assert run.checkpoint_run("kore") == run.checkpoints / "r-kore"
    assert run_name(tmp_path / "r", "kore", "mine") == "mine"


def test_a_record_is_current_only_for_the_inputs_it_holds(tmp_path):
    path = tmp_path / "stage.json"
    assert not is_current(path, {"a": 1})  # nothing written yet
    write_record(path, {"a": 1, "b": [1, 2], "kind": "x"})
    assert is_current(path, {"a": 1, "b": [1, 2]})  # a manifest also says other things
    assert not is_current(path, {"a": 2})
    assert not is_current(path, {"a": 1, "new_setting": 0})  # a new input: run again
    path.write_text("{half")
    assert read_record(path) is None and not is_current(path, {"a": 1})


def test_atomic_write_leaves_no_temporary_files(tmp_path):
    atomic_write(tmp_path / "d" / "f.json", b"one")
    atomic_write(tmp_path / "d" / "f.json", b"two")
    assert [p.name for p in (tmp_path / "d").iterdir()] == ["f.json"]
    assert (tmp_path / "d" / "f.json").read_bytes() == b"two"
