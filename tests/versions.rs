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
