// Overview: every VM's protection, running jobs, last day's failures, hosts, storage (GET /v1/overview).
import { html, useEffect, useState } from "./vendor/preact-htm.js";
import * as api from "./api.js";
import { Badge, ErrorBox, Progress, age, formatBytes, formatDate, formatDuration, short, useLoad } from "./ui.js";

const KIND_LABEL = { standby: "Standby", remote: "Remote", cloud: "Cloud" };
const REFRESH_MS = 10000;
const PAGE_ROWS = 100; // VM rows a page of the table shows (asked of the API a page at a time)
const FAILURE_ROWS = 20; // failures listed before "Show all"
const FIND_DELAY_MS = 300; // the find text goes to the API once typing pauses this long

/** A running API job's progress, polled at GET /v1/api-jobs/{uuid} while it runs. */
function LiveProgress({ job }) {
  const [state, setState] = useState({ progress: job.progress, done: false, error: null });
  useEffect(() => {
    let stop = false;
    const poll = async () => {
      try {
        const now = await api.jobState(job.uuid);
        if (stop) return;
        setState({ progress: now.done ? 100 : now.progress, done: now.done, error: null });
        if (!now.done) setTimeout(poll, 1000);
      } catch (error) {
        if (!stop) setState((old) => ({ ...old, done: true, error }));
      }
    };
    poll();
    return () => {
      stop = true;
    };
  }, [job.uuid]);
  if (state.error) return html`<${Badge} value="Failed" /> ${state.error.message}`;
  if (state.done) return html`<${Badge} value="Ready" />`;
  return html`<${Progress} value=${state.progress} label=${`${job.action} progress`} />`;
}

function VmTable({ data, kinds, showProject, projects, choice }) {
  const vms = data.vmInstances;
  const pages = Math.max(1, Math.ceil(data.vmTotal / PAGE_ROWS));
  const first = choice.page * PAGE_ROWS;
  useEffect(() => {
    if (choice.page > pages - 1) choice.setPage(pages - 1); // the list shrank under the page shown
  }, [pages]);
  const pager = () =>
    html`<${Pager} at=${choice.page} pages=${pages} first=${first} shown=${vms.length} count=${data.vmTotal} setPage=${choice.setPage} />`;
  return html`<section class="panel" aria-labelledby="vms-title">
    <h2 id="vms-title">Virtual machines</h2>
    <form class="inline" role="search" onSubmit=${(e) => e.preventDefault()}>
      <label>Find <input type="search" value=${choice.filter} onInput=${(e) => choice.setFilter(e.target.value)} placeholder="name or uuid" /></label>
      <label>Status
        <select value=${choice.status} onChange=${(e) => choice.setStatus(e.target.value)}>
          <option value="">all</option><option value="ok">OK</option><option value="overdue">overdue</option>
          <option value="failed">failed</option><option value="none">no backup</option>
        </select>
      </label>
      <span class="muted">${data.vmTotal} of ${Object.values(data.vmCounts).reduce((a, b) => a + b, 0)}</span>
    </form>
    ${pager()}
    <div class="table-wrap">
      <table class="responsive" id="vm-table">
        <thead><tr>
          <th>VM</th><th>Status</th>${showProject ? html`<th>Project</th>` : null}<th>Last good backup</th><th class="num">Age</th>
          <th class="num">Size</th>${kinds.map((k) => html`<th>${KIND_LABEL[k]} copy</th>`)}
        </tr></thead>
        <tbody>
          ${vms.map(
            (vm) => html`<tr class="status-${vm.status}" data-vm=${vm.uuid}>
              <td data-label="VM"><a href="#/vm/${vm.uuid}">${vm.name || short(vm.uuid)}</a></td>
              <td data-label="Status"><${Badge} value=${vm.status} />${vm.status === "failed" && vm.lastFailure
                ? html` <span class="muted">${formatDate(vm.lastFailure)}</span>`
                : null}</td>
              ${showProject ? html`<td data-label="Project">${projects[vm.projectUuid] || (vm.projectUuid ? short(vm.projectUuid) : "–")}</td>` : null}
              <td data-label="Last good backup">${vm.lastBackup ? formatDate(vm.lastBackup.createDate) : "none"}</td>
              <td data-label="Age" class="num">${vm.lastBackup ? formatDuration(vm.lastBackup.ageSeconds) : "–"}</td>
              <td data-label="Size" class="num">${vm.lastBackup ? formatBytes(vm.lastBackup.size) : "–"}</td>
              ${kinds.map(
                (k) => html`<td data-label="${KIND_LABEL[k]} copy">${!vm.lastBackup
                  ? "–"
                  : vm.copies[k]
                    ? html`<span class="badge ok">current</span>`
                    : html`<span class="badge warn">behind</span>`}</td>`,
              )}
            </tr>`,
          )}
        </tbody>
      </table>
    </div>
    ${pager()}
  </section>`;
}

/** Previous / next page of the VM table, a page the API's answer (GET /v1/overview?limit=&start=):
 * the whole list of 1,000 VMs took the API ~2 s and chromium ~0.5 s more to lay out on a loaded
 * 2-core machine (docs/benchmarks.md); every VM stays a filter or a page away. */
function Pager({ at, pages, first, shown, count, setPage }) {
  if (pages <= 1) return null;
  return html`<nav class="inline pager" aria-label="VM table pages">
    <button type="button" disabled=${at === 0} onClick=${() => setPage(at - 1)}>Previous</button>
    <span>VMs ${shown ? first + 1 : 0}–${first + shown} of ${count} (page ${at + 1} of ${pages})</span>
    <button type="button" disabled=${at >= pages - 1} onClick=${() => setPage(at + 1)}>Next</button>
  </nav>`;
}

/** The last day's failures, newest first: the first FAILURE_ROWS, the rest on request (the API
 * sends up to 200 of each kind, and a few hundred rows cost the first render as much as the VMs). */
function Failures({ failures }) {
  const [all, setAll] = useState(false);
  const shown = all ? failures : failures.slice(0, FAILURE_ROWS);
  return html`<section class="panel" aria-labelledby="failures-title">
    <h2 id="failures-title">Failures in the last 24 hours</h2>
    ${failures.length === 0
      ? html`<p class="muted">Nothing failed.</p>`
      : html`<div class="table-wrap"><table id="failures"><thead><tr><th>When</th><th>What</th><th>Reason</th></tr></thead><tbody>
          ${shown.map(
            (f) => html`<tr><td>${formatDate(f.date)}</td>
              <td>${f.source === "jobHistory" ? "scheduled run" : f.action} <span class="mono">${short(f.resourceUuid)}</span></td>
              <td>${f.code ? html`<strong>${f.code}</strong>: ` : null}${f.reason || "–"}</td></tr>`,
          )}</tbody></table></div>`}
    ${failures.length > shown.length
      ? html`<button type="button" onClick=${() => setAll(true)}>Show all ${failures.length} failures</button>`
      : null}
  </section>`;
}

/** What the VM table shows: the find text (sent once typing pauses), a status, a page. */
function useChoice() {
  const [filter, setFilterNow] = useState("");
  const [find, setFind] = useState("");
  const [status, setStatusNow] = useState("");
  const [page, setPage] = useState(0);
  useEffect(() => {
    const timer = setTimeout(() => setFind(filter.trim()), FIND_DELAY_MS);
    return () => clearTimeout(timer);
  }, [filter]);
  const setFilter = (value) => {
    setFilterNow(value);
    setPage(0);
  };
  const setStatus = (value) => {
    setStatusNow(value);
    setPage(0);
  };
  const query = { limit: String(PAGE_ROWS), start: String(page * PAGE_ROWS) };
  if (status) query.status = status;
  if (find) query.q = find;
  return { filter, setFilter, status, setStatus, page, setPage, query, key: JSON.stringify(query) };
}

export function OverviewPage({ ctx }) {
  const choice = useChoice();
  const { data, error, loading } = useLoad(() => api.get("/v1/overview", choice.query), [choice.key], REFRESH_MS);
  // names only: a project's full inventory adds its usage, summed over all its backups (~100 ms
  // of PostgreSQL's CPU at 100,000 backups), which this page does not show
  const projects = useLoad(
    async () => Object.fromEntries((await api.rows("projects", [], { fields: "uuid,name" })).map((p) => [p.uuid, p.name])),
    [],
  );
  if (!data) return html`<h1>Overview</h1>${loading ? html`<p>Loading…</p>` : html`<${ErrorBox} error=${error} />`}`;
  const counts = data.vmCounts;
  const kinds = ["standby", "remote", "cloud"].filter((k) => data.backupStorage.some((s) => s.kind === k));
  return html`<h1>Overview</h1>
    <${ErrorBox} error=${error} />
    <div class="tiles" aria-label="Summary">
      <div class="tile"><span class="n">${counts.ok + counts.overdue + counts.failed + counts.none}</span>VMs</div>
      <div class="tile ok"><span class="n">${counts.ok}</span>protected</div>
      <div class="tile overdue"><span class="n">${counts.overdue}</span>overdue</div>
      <div class="tile failed"><span class="n">${counts.failed}</span>failed</div>
      <div class="tile"><span class="n">${counts.none}</span>no backup</div>
      <div class="tile"><span class="n">${data.runningJobs.length}</span>jobs running</div>
    </div>
    <${VmTable} data=${data} kinds=${kinds} showProject=${Object.keys(projects.data || {}).length > 0} projects=${projects.data || {}} choice=${choice} />
    <div class="grid2">
      <section class="panel" aria-labelledby="running-title">
        <h2 id="running-title">Running jobs</h2>
        ${data.runningJobs.length === 0
          ? html`<p class="muted">No API job is running.</p>`
          : html`<table id="running-jobs"><thead><tr><th>Job</th><th>Resource</th><th>Started</th><th>Progress</th></tr></thead><tbody>
              ${data.runningJobs.map(
                (job) => html`<tr data-job=${job.uuid}><td>${job.action}</td><td class="mono">${short(job.resourceUuid)}</td>
                  <td>${age(job.createDate)} ago</td><td><${LiveProgress} job=${job} /></td></tr>`,
              )}</tbody></table>`}
      </section>
      <${Failures} failures=${data.failures} />
      ${ctx.me.admin
        ? html`<section class="panel" aria-labelledby="hosts-title">
            <h2 id="hosts-title">Hosts</h2>
            ${data.hosts.length === 0
              ? html`<p class="muted">No host has registered yet (a worker registers its host when it starts).</p>`
              : html`<table id="hosts" class="responsive"><thead><tr><th>Host</th><th>Status</th><th>Last heartbeat</th></tr></thead><tbody>
                  ${data.hosts.map(
                    (h) => html`<tr><td data-label="Host">${h.name || h.hostname || short(h.uuid)}</td><td data-label="Status"><${Badge} value=${h.status} /></td>
                      <td data-label="Last heartbeat">${h.lastHeartbeat ? `${age(h.lastHeartbeat)} ago` : "never"}</td></tr>`,
                  )}</tbody></table>`}
          </section>`
        : null}
      <section class="panel" aria-labelledby="storage-title">
        <h2 id="storage-title">Backup storage</h2>
        <div class="table-wrap"><table id="storage" class="responsive"><thead><tr><th>Storage</th><th>Status</th><th>Used</th><th>Sync lag</th></tr></thead><tbody>
          ${data.backupStorage.map((s) => {
            const used = s.totalCapacity ? (s.totalCapacity - s.availableCapacity) / s.totalCapacity : 0;
            const lag = s.syncLag;
            return html`<tr data-storage=${s.uuid}>
              <td data-label="Storage">${s.name} <span class="muted">${s.type}${s.type === "ImageStore" ? ` ${s.role}` : ""}</span></td>
              <td data-label="Status"><${Badge} value=${s.status} /></td>
              <td data-label="Used"><meter min="0" max="1" high="0.85" value=${used} aria-label="${Math.round(used * 100)}% used"></meter>
                ${" "}${formatBytes(s.totalCapacity - s.availableCapacity)} of ${formatBytes(s.totalCapacity)}</td>
              <td data-label="Sync lag">${!lag
                ? html`<span class="muted">master</span>`
                : lag.missingBackups === 0
                  ? html`<span class="badge ok">in sync</span>`
                  : html`<span class="badge warn">${lag.atLeast ? "≥ " : ""}${lag.missingBackups} behind, ${formatDuration(lag.seconds)}</span>`}</td>
            </tr>`;
          })}
        </tbody></table></div>
      </section>
    </div>
    <p class="muted">Updated ${formatDate(data.generatedAt)}; refreshes every ${REFRESH_MS / 1000} s.</p>`;
}
