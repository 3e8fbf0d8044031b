"""How a rank reports an unexpected error (``adapter.train.failure``), in-process; the real run that meets one
is ``test_entry_point.test_an_unexpected_error_is_one_line_and_its_traceback_goes_to_the_run_folder``."""

from __future__ import annotations

from adapter.train.failure import MAX_LINE, report_unexpected


def _raised(exc: BaseException) -> BaseException:
    try:
        raise exc
    except BaseException as caught:  # noqa: BLE001  (a real traceback to report)
        return caught


def test_verbose_prints_the_traceback_it_also_logs(tmp_path, capsys):
    report_unexpected(_raised(KeyError("wq")), 3, tmp_path / "run", verbose=True)
    err = capsys.readouterr().err
    log = tmp_path / "run" / "error_rank3.log"
    assert err.splitlines()[0] == f"train: error (rank 3): unexpected KeyError: 'wq' (traceback in {log})"
    assert err.split("\n", 1)[1] == log.read_text() and "Traceback" in log.read_text()


def test_a_long_or_multiline_message_is_cut_to_one_line(tmp_path, capsys):
    report_unexpected(_raised(RuntimeError("\n" + "x" * 5000 + "\nsecond line")), 0, tmp_path, verbose=False)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "second line" not in err and len(err) < MAX_LINE + 200


def test_an_unwritable_run_folder_prints_the_traceback_instead(tmp_path, capsys):
    """The run folder lies under a file (denied even to root): the traceback must still go somewhere."""
    (tmp_path / "file").write_text("")
    report_unexpected(_raised(ValueError("boom")), 0, tmp_path / "file" / "run", verbose=False)
    err = capsys.readouterr().err
    assert err.startswith(f"train: error (rank 0): unexpected ValueError: boom (the traceback follows: "
                          f"{tmp_path / 'file' / 'run'} cannot be written)\nTraceback")


def test_a_rank_whose_peer_died_says_so(tmp_path, capsys):
    gloo = RuntimeError("[../gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:7563. This is "
                        "typically caused by a remote worker crashing.")
    report_unexpected(_raised(gloo), 0, tmp_path, verbose=False)
    assert capsys.readouterr().err == (f"train: rank 0 stopped: another rank failed (traceback in "
                                       f"{tmp_path / 'error_rank0.log'})\n")
