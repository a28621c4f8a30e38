"""Compiled languages: snippets run as written, compile errors and both timeouts, missing tools."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from kowalski.agent.languages import program_for
from kowalski.agent.sandbox import Sandbox
from kowalski.agent.snippets import java_program, rust_program
from kowalski.common.config import SandboxConfig
from kowalski.common.errors import UnsupportedLanguageError
from kowalski.common.messages import JobRequest, JobResult

COMPILED = ["rust", "java"]


def config(**overrides: Any) -> SandboxConfig:
    values: dict[str, Any] = {"mode": "bwrap", "memory_limit_mb": 512, "pids_limit": 64,
                              "max_output_bytes": 65536, "pool_size": 0}
    values.update(overrides)
    return SandboxConfig(**values)


def job(language: Any, code: str, **fields: Any) -> JobRequest:
    return JobRequest(job_id=f"t-{uuid.uuid4().hex[:8]}", language=language, code=code,
                      **fields)


async def started(work_root: Path, **overrides: Any) -> Sandbox:
    if os.geteuid() != 0:
        pytest.skip("bubblewrap mode needs root")
    box = Sandbox(config(**overrides), work_root=work_root)
    await box.start()
    return box


@pytest.fixture
async def sandbox(tmp_path: Path) -> AsyncIterator[Sandbox]:
    box = await started(tmp_path / "jobs")
    yield box
    await box.close()
    assert list((tmp_path / "jobs").iterdir()) == []


def need(sandbox: Sandbox, language: str) -> None:
    if language in sandbox.unavailable:
        pytest.skip(f"{language} is not installed here: {sandbox.unavailable[language]}")


def error_of(result: JobResult) -> tuple[str, str]:
    assert result.error is not None, result
    return result.error.code, result.error.message


# --- snippets, without a toolchain ------------------------------------------------------


def test_a_rust_snippet_gets_fn_main_and_its_items_stay_outside() -> None:
    program = rust_program(
        "use std::fmt;\n"
        "#[derive(Debug)]\nstruct Point { x: i32 }\n"
        "let p = Point { x: 1 }; // fn main() in a comment\n"
        'let text = r#"fn main() { }"#;\n'
        "fn double(v: i32) -> i32 { v * 2 }\n"
        "let brace = '{';\n"
        'println!("{:?} {} {} {}", p, double(21), text, brace);\n')
    assert program.wrapped
    head, _, body = program.source.partition("fn main() {\n")
    assert "use std::fmt;" in head
    assert "struct Point" in head
    assert "fn double" in head
    assert "let p" not in head
    assert body.index("let p") < body.index("let text") < body.index("println!")
    assert body.rstrip().endswith("}")


def test_a_rust_program_with_fn_main_is_kept_as_written() -> None:
    code = '// a helper first\nfn helper() {}\n\nfn main() {\n    helper();\n}\n'
    program = rust_program(code)
    assert (program.source, program.wrapped) == (code, False)


def test_a_java_snippet_is_wrapped_in_main_with_its_imports_on_top() -> None:
    program = java_program('import java.util.*;\n\nList<String> l = List.of("class X {");\n'
                           "System.out.println(l);\n")
    assert program.wrapped
    assert (program.source_file, program.main_class) == ("Main.java", "Main")
    assert program.source.startswith("import java.util.*;\n")
    assert program.source.index("public static void main") < program.source.index("List.of")


def test_a_java_program_runs_its_main_class_from_a_file_of_its_public_name() -> None:
    code = ("/* class Comment {} */\nclass Helper { static int two() { return 2; } }\n"
            "public final class Hello {\n"
            "    public static void main(String[] args) { System.out.println(\"}\"); }\n"
            "    public static class Inner {}\n}\n")
    program = java_program(code)
    assert (program.source_file, program.main_class, program.source) == (
        "Hello.java", "Hello", code)


def test_interpreted_languages_run_their_code_unchanged() -> None:
    program = program_for("python", "print(1)")
    assert (program.source_file, program.source, program.wrapped) == ("main.py", "print(1)",
                                                                      False)


# --- snippets and complete programs, run ------------------------------------------------


async def test_a_java_statement_runs_as_written(sandbox: Sandbox) -> None:
    need(sandbox, "java")
    result = await sandbox.run_job(job("java", "System.out.println(6*7);"))
    assert (result.status, result.stdout, result.error) == ("ok", "42\n", None)


async def test_a_java_job_over_its_memory_limit_gets_an_out_of_memory_error(
        sandbox: Sandbox) -> None:
    need(sandbox, "java")
    # On cgroup v1 the JVM cannot read the job's limit itself: it is told it.
    result = await sandbox.run_job(job("java", """
System.out.println(Runtime.getRuntime().maxMemory() >> 20);
java.util.List<long[]> kept = new java.util.ArrayList<>();
while (true) kept.add(new long[1 << 20]);
""", timeout_ms=60_000))
    assert result.status == "error", result
    assert 0 < int(result.stdout.split()[0]) <= sandbox.config.memory_limit_mb
    assert "java.lang.OutOfMemoryError" in result.stderr


async def test_a_java_snippet_with_imports_runs(sandbox: Sandbox) -> None:
    need(sandbox, "java")
    code = ("import java.util.stream.*;\n"
            "var total = IntStream.rangeClosed(1, 10).sum();\n"
            'System.out.println("sum " + total);\n')
    result = await sandbox.run_job(job("java", code))
    assert (result.status, result.stdout) == ("ok", "sum 55\n")


async def test_a_java_program_whose_class_is_not_main_runs_unchanged(sandbox: Sandbox) -> None:
    need(sandbox, "java")
    code = ("class Helper { static int answer() { return 42; } }\n"
            "public class Hello {\n"
            "    public static void main(String[] args) {\n"
            "        System.out.println(\"hello \" + Helper.answer());\n    }\n}\n")
    result = await sandbox.run_job(job("java", code))
    assert (result.status, result.stdout) == ("ok", "hello 42\n")


async def test_a_rust_snippet_without_fn_main_runs(sandbox: Sandbox) -> None:
    need(sandbox, "rust")
    code = ("use std::collections::HashMap;\n"
            "fn square(v: u64) -> u64 { v * v }\n"
            "let mut seen = HashMap::new();\n"
            "for i in 1..=3 { seen.insert(i, square(i)); }\n"
            "let mut keys: Vec<_> = seen.keys().collect();\n"
            "keys.sort();\n"
            'println!("{:?} {}", keys, seen[&3]);\n')
    result = await sandbox.run_job(job("rust", code))
    assert (result.status, result.stdout, result.error) == ("ok", "[1, 2, 3] 9\n", None)


async def test_a_rust_job_reads_stdin_and_keeps_its_exit_code(sandbox: Sandbox) -> None:
    need(sandbox, "rust")
    code = ("use std::io::Read;\nlet mut text = String::new();\n"
            "std::io::stdin().read_to_string(&mut text).unwrap();\n"
            'print!("{}", text.to_uppercase());\nstd::process::exit(4);\n')
    result = await sandbox.run_job(job("rust", code, stdin="shout\n"))
    assert (result.status, result.stdout, result.exit_code) == ("error", "SHOUT\n", 4)
    assert error_of(result)[0] == "repl_error"


# --- compile errors and timeouts ----------------------------------------------------------


async def test_a_rust_compile_error_comes_back_with_the_compiler_message(
        sandbox: Sandbox) -> None:
    need(sandbox, "rust")
    result = await sandbox.run_job(job("rust", 'println!("{}", undefined_name);'))
    assert result.status == "error"
    code, message = error_of(result)
    assert code == "repl_error"
    assert message.startswith("rust compilation failed: error[E0425]")
    assert "undefined_name" in message
    assert "cannot find value `undefined_name`" in result.stderr
    assert result.error is not None
    assert not result.error.retryable


async def test_a_java_compile_error_comes_back_with_the_compiler_message(
        sandbox: Sandbox) -> None:
    need(sandbox, "java")
    result = await sandbox.run_job(job("java", "int x = \"text\";\nSystem.out.println(x);"))
    assert result.status == "error"
    code, message = error_of(result)
    assert code == "repl_error"
    assert message.startswith("java compilation failed: Main.java:")
    assert "incompatible types" in message
    assert "incompatible types" in result.stderr


@pytest.mark.parametrize("language", COMPILED)
async def test_compilation_past_its_own_limit_is_a_compile_timeout(
        tmp_path: Path, language: str) -> None:
    box = await started(tmp_path / "jobs", **{f"compile_timeout_ms_{language}": 50})
    try:
        need(box, language)
        code = {"rust": 'println!("never");', "java": 'System.out.println("never");'}[language]
        result = await box.run_job(job(language, code, timeout_ms=60_000))
        assert (result.status, result.stdout) == ("timeout", "")
        assert error_of(result) == ("repl_timeout",
                                    f"{language} compilation exceeded the 0.05 s limit")
    finally:
        await box.close()


async def test_the_run_limit_does_not_count_the_compilation(sandbox: Sandbox) -> None:
    need(sandbox, "rust")
    # rustc takes longer than this on any machine (80 ms at best); only the run, about
    # 25 ms in the sandbox, is held to it.
    result = await sandbox.run_job(job("rust", 'println!("quick");', timeout_ms=70))
    assert (result.status, result.stdout) == ("ok", "quick\n")
    assert result.wall_time_ms > 70


@pytest.mark.parametrize("language", COMPILED)
async def test_a_compiled_program_past_its_run_limit_times_out_in_seconds(
        sandbox: Sandbox, language: str) -> None:
    need(sandbox, language)
    code = {"rust": 'println!("started");\nloop { std::hint::spin_loop(); }',
            "java": 'System.out.println("started");\nwhile (true) { Thread.onSpinWait(); }'}
    result = await sandbox.run_job(job(language, code[language], timeout_ms=1500))
    assert (result.status, result.stdout, result.exit_code) == ("timeout", "started\n", None)
    assert error_of(result) == ("repl_timeout", f"{language} code exceeded the 1.5 s limit")


# --- missing toolchains -------------------------------------------------------------------


async def test_a_missing_rust_or_java_is_named_with_the_key_to_set(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CARGO_HOME", str(tmp_path / "no-cargo"))
    monkeypatch.delenv("JAVA_HOME", raising=False)
    empty = tmp_path / "bin"
    empty.mkdir()
    box = Sandbox(config(mode="none"), work_root=tmp_path / "jobs", search_path=str(empty))
    await box.start()
    try:
        assert box.unavailable["rust"] == f"no rustc on {empty} (set sandbox.rustc_path)"
        assert box.unavailable["java"] == f"no java on {empty} (set sandbox.java_path)"
        with pytest.raises(UnsupportedLanguageError) as caught:
            await box.run_job(job("rust", 'println!("x");'))
        assert "language 'rust' is not supported here" in caught.value.user_message()
        assert "Use one of the languages the agent advertises" in caught.value.user_message()
    finally:
        await box.close()


async def test_a_java_runtime_without_javac_is_not_offered(tmp_path: Path) -> None:
    runtime = tmp_path / "jre" / "bin"
    runtime.mkdir(parents=True)
    java = runtime / "java"
    java.write_text("#!/bin/sh\necho 'openjdk 17 (runtime only)'\n")
    java.chmod(0o755)
    box = Sandbox(config(mode="none", java_path=str(java)), work_root=tmp_path / "jobs")
    await box.start()
    try:
        assert box.unavailable["java"] == (
            f"no javac beside {java}: install a JDK, not only a runtime "
            "(apt-get install default-jdk-headless)")
        assert "java" not in box.languages
    finally:
        await box.close()
