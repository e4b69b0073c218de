"""Team servers on PostgreSQL (flows.team): ``baton serve --db`` and ``baton run --server`` against it.

Everything real and on loopback: a PostgreSQL started here (tools/pgserver.py), ``baton serve --db`` in its own
process group (Prefect server + MLflow server), ``baton run`` processes. The refusals that need no server are
fast; the rest is ``slow``."""
import base64
import json
import threading
import urllib.error
import urllib.request

import pytest
from conftest import baton
from tools.pgserver import free_port, pg_bin, postgres
from tools.servers import TeamServers as Team

from flows.cli import main

needs_pg = pytest.mark.skipif(pg_bin() is None, reason="PostgreSQL is not installed")


def test_password_in_db_url_is_refused(tmp_path, capsys):
    rc = main(["serve", "--db", "postgresql://baton:hunter2@db:5432/baton", "--artifacts", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 1
    assert "PGPASSFILE" in err and "db:5432:baton:baton:PASSWORD" in err and "hunter2" not in err
    assert list(tmp_path.iterdir()) == []  # refused before anything was created


def test_non_loopback_without_auth_is_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("BATON_AUTH", raising=False)
    monkeypatch.delenv("BATON_AUTH_FILE", raising=False)
    rc = main(["serve", "--db", "postgresql://baton@db/baton", "--host", "0.0.0.0", "--artifacts", str(tmp_path)])
    assert rc == 1
    assert "--host 0.0.0.0: a server reachable from other machines requires authentication" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_store_whose_team_server_is_gone_is_refused(tmp_path):
    """A store that names a team server (team.json) which does not answer: refused, never a private SQLite
    server started inside the shared store."""
    url = f"http://127.0.0.1:{free_port()}/api"
    (tmp_path / "team.json").write_text(json.dumps({"prefect_api": url, "pid": 1, "host": "head"}))
    p = baton(["run", "configs/vlp-micro.yaml", "--only", "world"], tmp_path, check=False)
    assert p.returncode == 1
    assert f"team.json names the team server {url}, which does not answer" in p.stderr
    assert not (tmp_path / "stages").exists() and not (tmp_path / "prefect" / "server.json").exists()
    assert not list(tmp_path.rglob("*.db"))


def _status(url: str, auth: str | None = None, body: dict | None = None) -> int:
    req = urllib.request.Request(url, data=None if body is None else json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    if auth:
        req.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


@needs_pg
@pytest.mark.slow
def test_auth_when_bound_to_all_interfaces(tmp_path):
    """Bound to 0.0.0.0 with BATON_AUTH (from the environment) and the database password from PGPASSFILE:
    through 127.0.0.1, both servers refuse a request without credentials and answer one with them; a
    `baton run` with the credentials tracks to the server, one without is refused with a hint."""
    with postgres(password="pg-secret") as pg:
        passfile = tmp_path / "pgpass"
        passfile.write_text(f"127.0.0.1:{pg.port}:baton:baton:pg-secret\n")
        passfile.chmod(0o600)
        art = tmp_path / "store"
        env = {"BATON_AUTH": "alice:team-secret-2026", "PGPASSFILE": str(passfile)}
        team = Team(pg.url, art, host="0.0.0.0", env=env)
        try:
            flows = f"{team.api}/flows/filter"
            exps = f"{team.mlflow}/api/2.0/mlflow/experiments/search"
            assert _status(flows, body={}) == 401
            assert _status(flows, "alice:team-secret-2026", body={}) == 200
            assert _status(flows, "alice:wrong", body={}) == 401
            assert _status(exps, body={"max_results": 1}) == 401
            assert _status(exps, "alice:team-secret-2026", body={"max_results": 1}) == 200
            no_auth = {"BATON_AUTH": "", "PGPASSFILE": str(passfile)}
            p = baton(["run", "configs/vlp-micro.yaml", "--only", "world", "--server", team.api], art, check=False,
                      env=no_auth)
            assert p.returncode == 1 and "HTTP 401" in p.stderr and "BATON_AUTH" in p.stderr
            p = baton(["run", "configs/vlp-micro.yaml", "--only", "world", "--server", team.api, "--json"], art,
                      env=env)
            assert json.loads(p.stdout)["stages"][0]["state"] == "ran"
            assert not (art / "mlflow.db").exists()
        finally:
            team.stop()
        assert not (art / "team.json").exists()
        assert "pg-secret" not in " ".join(team.proc.args) and "team-secret-2026" not in " ".join(team.proc.args)


@needs_pg
@pytest.mark.slow
def test_two_users_one_store(tmp_path):
    """Two `baton run`s of recipes that share world, cnn and bert (each with its own detector), started
    together against one team server and one store: each shared stage trains once (one MLflow stage run),
    the other run waits for its lease and reports it cached; both complete; both parent runs link the one
    LoggedModel of each shared stage; no process opened an SQLite tracking store."""
    from mlflow import MlflowClient

    with postgres() as pg:
        art = tmp_path / "store"
        team = Team(pg.url, art)
        try:
            common = ["run", "configs/vlp-micro.yaml", "--only", "detector", "--only", "bert", "--json"]
            # the second user finds the team server through the store's team.json, without --server
            users = [common + ["--server", team.api], common + ["stages.detector.train.lr=0.002"]]
            assert (art / "team.json").exists()
            out = [None, None]

            def go(i: int) -> None:
                out[i] = baton(users[i], art, check=False, env={"BATON_HOSTNAME": f"user{i}-host"})

            threads = [threading.Thread(target=go, args=(i,)) for i in range(2)]
            [t.start() for t in threads]
            [t.join() for t in threads]
            for p in out:
                assert p.returncode == 0, p.stderr[-4000:]
            runs = [{s["name"]: s for s in json.loads(p.stdout)["stages"]} for p in out]
            client = MlflowClient(tracking_uri=team.mlflow)
            exp = client.get_experiment_by_name("vlp-micro")
            for stage in ("world", "cnn", "bert"):
                assert sorted(r[stage]["state"] for r in runs) == ["cached", "ran"], stage
                stage_runs = client.search_runs([exp.experiment_id], f"tags.`baton.stage` = '{stage}'")
                trained = [r for r in stage_runs if r.data.tags.get("baton.cached") != "true"]
                assert len(trained) == 1, stage  # trained once; the other user's parent has a cached child run
                cached = [r for r in stage_runs if r.data.tags.get("baton.cached") == "true"]
                assert [r.data.tags.get("baton.cached_from") for r in cached] == [trained[0].info.run_id], stage
                assert runs[0][stage]["mlflow_model_id"] == runs[1][stage]["mlflow_model_id"]
            assert runs[0]["detector"]["fingerprint"] != runs[1]["detector"]["fingerprint"]
            for p in out:
                parent = client.get_run(json.loads(p.stdout)["mlflow_parent_run_id"])
                linked = {m.model_id for m in parent.inputs.model_inputs}
                assert {runs[0][s]["mlflow_model_id"] for s in ("cnn", "bert")} <= linked
            assert not list(art.rglob("*.db"))
            from flows.lease import connect

            with connect(pg.url) as c, c.cursor() as cur:
                cur.execute("SELECT count(*) FROM baton.stage_lease")
                assert cur.fetchone()[0] == 0  # every lease released
        finally:
            team.stop()
        assert not (art / "team.json").exists()
