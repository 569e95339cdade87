"""The bridge to HELM: HELM requests to engine calls (`backend`), HELM's client, runner and plugin for `helm-run`,
the offline environment HELM needs, HELM results to JSON and back, and token ids to HELM's token texts."""
