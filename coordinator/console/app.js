// The ddpm-train console: a page over the coordinator's /api/v1/. No framework, no build step.
// The token lives in this script's memory only and travels as a bearer header; images and event
// streams are fetched with it too (an <img src> or EventSource could not carry it).
'use strict';

const STATES = ['QUEUED', 'STARTING', 'RUNNING', 'STOPPING', 'STOPPED', 'COMPLETED', 'FAILED'];
const FINAL = new Set(['STOPPED', 'COMPLETED', 'FAILED']);
const COLORS = ['#3559e0', '#e07a1f', '#1f9d55', '#b83ac9', '#d23c3c', '#0f9fb0'];
const QUARTILE_COLORS = ['#7b8cf0', '#3fb5c9', '#f0a94a', '#d2555a'];

const session = { token: '', role: '' };
// What tests and people can read: the charts by name, and counts of what live updates did.
const consoleState = { charts: {}, updates: 0, route: '', images: {} };
window.ddpmConsole = consoleState;

let current = null;  // the page on screen: { abort: AbortController, ... }

// ---------- small helpers ----------
const $ = (selector, root = document) => root.querySelector(selector);
function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (key === 'class') node.className = value;
    else if (key === 'text') node.textContent = value;
    else if (key.startsWith('on')) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value === true ? '' : value);
  }
  for (const child of children.flat()) {
    if (child === undefined || child === null || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}
function fmt(value, digits = 4) {
  if (value === undefined || value === null || Number.isNaN(value)) return '-';
  const n = Number(value);
  if (n === 0) return '0';
  if (Math.abs(n) >= 1000) return n.toFixed(0);
  return Number(n.toPrecision(digits)).toString();
}
function duration(seconds) {
  if (!seconds || seconds <= 0 || !Number.isFinite(seconds)) return '-';
  const s = Math.round(seconds);
  if (s < 60) return s + 's';
  if (s < 3600) return Math.floor(s / 60) + 'm' + String(s % 60).padStart(2, '0') + 's';
  const h = Math.floor(s / 3600);
  return h + 'h' + String(Math.floor((s % 3600) / 60)).padStart(2, '0') + 'm';
}
function when(ms) {
  if (!ms) return '-';
  return new Date(Number(ms)).toLocaleString();
}
function bytes(n) {
  n = Number(n || 0);
  if (n < 1024) return n + ' B';
  const units = ['KiB', 'MiB', 'GiB', 'TiB'];
  let i = -1;
  do { n /= 1024; i++; } while (n >= 1024 && i < units.length - 1);
  return n.toFixed(1) + ' ' + units[i];
}
function toast(message, bad = false) {
  const box = $('#toast');
  box.textContent = message;
  box.className = 'toast' + (bad ? ' bad' : '');
  box.hidden = false;
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => { box.hidden = true; }, 6000);
}
function stateBadge(state) { return el('span', { class: 'state ' + state, text: state }); }
function progressBar(run) {
  const total = Number(run.total_steps || 0);
  const step = Number((run.metrics && run.metrics.step) || 0);
  const share = total > 0 ? Math.min(1, step / total) : 0;
  const kind = run.state === 'COMPLETED' ? ' done' : run.state === 'FAILED' ? ' failed' : '';
  const fill = el('div');
  fill.style.width = (share * 100).toFixed(1) + '%';
  const eta = run.state === 'RUNNING' && run.metrics ? ' · ETA ' + duration(run.metrics.eta_seconds) : '';
  return el('div', { class: 'progress' }, el('div', { class: 'bar' + kind }, fill),
    el('div', { class: 'sub', text: `${step}/${total || '?'} (${(share * 100).toFixed(0)}%)${eta}` }));
}

// ---------- the API ----------
class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}
async function api(path, options = {}) {
  const headers = { Authorization: 'Bearer ' + session.token };
  if (options.body !== undefined) headers['Content-Type'] = 'application/json';
  const response = await fetch('/api/v1/' + path, {
    method: options.method || 'GET', headers, cache: 'no-store', signal: options.signal,
    body: options.body === undefined ? undefined : JSON.stringify(options.body),
  });
  if (response.status === 401) {
    const body = await response.json().catch(() => ({}));
    signOut(body.error || 'the token was refused');
    throw new ApiError(401, body.error || 'unauthorized');
  }
  const body = await response.json().catch(() => ({}));
  if (!response.ok) throw new ApiError(response.status, body.error || response.statusText);
  return body;
}
// A run's file as an object URL, fetched with the token once and kept.
async function runImage(run, path) {
  const key = run + '/' + path;
  if (!consoleState.images[key]) {
    consoleState.images[key] = (async () => {
      const response = await fetch(`/api/v1/runs/${run}/files/${path}`, {
        headers: { Authorization: 'Bearer ' + session.token },
      });
      if (!response.ok) {
        delete consoleState.images[key];
        throw new ApiError(response.status, (await response.json().catch(() => ({}))).error);
      }
      return URL.createObjectURL(await response.blob());
    })();
  }
  return consoleState.images[key];
}
function imageOf(run, path, attrs = {}) {
  const img = el('img', Object.assign({ alt: path }, attrs));
  runImage(run, path).then((url) => { img.src = url; }).catch((error) => {
    img.alt = path + ': ' + error.message;
  });
  return img;
}
// Server-Sent Events over fetch (EventSource cannot send the bearer header), reconnecting
// with backoff until signal aborts.
async function stream(path, onEvent, signal) {
  let backoff = 500;
  while (!signal.aborted) {
    try {
      const response = await fetch('/api/v1/' + path, {
        headers: { Authorization: 'Bearer ' + session.token, Accept: 'text/event-stream' },
        signal, cache: 'no-store',
      });
      if (response.status === 401) { signOut('the token was refused'); return; }
      if (response.status === 404) return;
      if (!response.ok) throw new Error('HTTP ' + response.status);
      live(true);
      backoff = 500;
      const reader = response.body.getReader();
      const decoder = new TextDecoder();
      let buffer = '';
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += decoder.decode(value, { stream: true });
        let end;
        while ((end = buffer.indexOf('\n\n')) >= 0) {
          const frame = buffer.slice(0, end);
          buffer = buffer.slice(end + 2);
          let name = 'message', data = '';
          for (const line of frame.split('\n')) {
            if (line.startsWith('event: ')) name = line.slice(7);
            else if (line.startsWith('data: ')) data += line.slice(6);
          }
          if (!data) continue;
          if (onEvent(name, JSON.parse(data)) === false) return;
        }
      }
    } catch (error) {
      if (signal.aborted) return;
    }
    live(false);
    await new Promise((resolve) => setTimeout(resolve, backoff));
    backoff = Math.min(backoff * 2, 8000);
  }
}
function live(on) {
  const badge = $('#live');
  badge.textContent = on ? 'live' : 'reconnecting';
  badge.className = 'live ' + (on ? 'on' : 'off');
}
// Calls fn at most once per interval, the last call always landing.
function throttle(fn, interval) {
  let timer = null, pending = false, last = 0;
  return function run() {
    const now = Date.now();
    if (now - last >= interval && !timer) {
      last = now;
      fn();
      return;
    }
    pending = true;
    if (!timer) {
      timer = setTimeout(() => {
        timer = null;
        if (pending) { pending = false; last = Date.now(); fn(); }
      }, Math.max(0, interval - (now - last)));
    }
  };
}

// ---------- charts ----------
function lineChart(name, canvas, options) {
  const chart = new Chart(canvas, {
    type: 'line',
    data: { datasets: options.datasets },
    options: {
      animation: false, responsive: true, maintainAspectRatio: false, normalized: true,
      parsing: false, spanGaps: true,
      interaction: { mode: 'nearest', intersect: false, axis: 'x' },
      elements: { point: { radius: options.points ? 3 : 0 }, line: { borderWidth: 1.6 } },
      plugins: {
        legend: { display: options.datasets.length > 1, labels: { boxWidth: 12, font: { size: 11 } } },
        title: { display: true, text: options.title, align: 'start', font: { size: 13, weight: '600' } },
        decimation: { enabled: false },
      },
      scales: {
        x: { type: 'linear', title: { display: true, text: options.x || 'step' }, ticks: { maxTicksLimit: 8 } },
        y: {
          type: options.log ? 'logarithmic' : 'linear', beginAtZero: !options.log && !options.tight,
          ticks: { maxTicksLimit: 6, callback: (v) => (v !== 0 && Math.abs(v) < 0.01 ? Number(v).toExponential(1) : fmt(v, 3)) },
        },
      },
    },
  });
  consoleState.charts[name] = chart;
  return chart;
}
function dataset(label, color, data = [], extra = {}) {
  return Object.assign({ label, data, borderColor: color, backgroundColor: color, pointRadius: 0 }, extra);
}
function chartBox(small = false) {
  const canvas = el('canvas');
  return { box: el('div', { class: 'chart' + (small ? ' small' : '') }, canvas), canvas };
}

// ---------- sign in ----------
function signOut(message) {
  session.token = '';
  session.role = '';
  if (current) current.abort.abort();
  current = null;
  $('#view').replaceChildren();
  $('#role').textContent = '';
  $('#signout').hidden = true;
  $('#login').hidden = false;
  $('#login-error').textContent = message || '';
  $('#token').value = '';
  $('#token').focus();
}
async function signIn(token) {
  session.token = token;
  try {
    const who = await api('session');
    session.role = who.role;
  } catch (error) {
    if (error.status !== 401) $('#login-error').textContent = error.message;
    return;
  }
  $('#login').hidden = true;
  $('#role').textContent = session.role === 'control' ? 'control' : 'viewer (read-only)';
  $('#signout').hidden = false;
  route();
}
function canAct() { return session.role === 'control'; }
function actButton(label, cls, handler) {
  return el('button', {
    class: cls, type: 'button', disabled: !canAct(),
    title: canAct() ? undefined : 'needs the control token; this is the viewer token',
    onclick: handler,
  }, label);
}

// ---------- actions ----------
async function stopRun(id, immediate = false) {
  try {
    const reply = await api(`runs/${id}:stop`, { method: 'POST', body: { immediate } });
    toast(`${id}: ${reply.run.state}`);
  } catch (error) { toast(`stop ${id}: ${error.message}`, true); }
}
async function deleteRun(id) {
  if (!confirm(`Forget run ${id}? Its files stay on disk.`)) return;
  try {
    await api(`runs/${id}:delete`, { method: 'POST', body: {} });
    toast(`${id} deleted`);
    if (location.hash.startsWith('#/runs/')) location.hash = '#/runs';
  } catch (error) { toast(`delete ${id}: ${error.message}`, true); }
}
function evaluateDialog(id) {
  const checkpoints = el('input', { type: 'text', value: 'latest' });
  const samples = el('input', { type: 'number', min: '10', placeholder: "the run's eval.num_samples" });
  const reference = el('input', { type: 'text', placeholder: "the run's eval.reference_stats" });
  const inception = el('input', { type: 'text', placeholder: "the run's eval.inception_weights" });
  const dialog = el('dialog', {},
    el('h2', { text: `Evaluate ${id}` }),
    el('label', { text: 'Checkpoints: latest, all, every:K or a step' }), checkpoints,
    el('label', { text: 'Samples per checkpoint' }), samples,
    el('label', { text: 'Reference statistics (.npz)' }), reference,
    el('label', { text: 'Inception weights' }), inception,
    el('div', { class: 'buttons' },
      el('button', { class: 'secondary', type: 'button', onclick: () => dialog.close() }, 'Cancel'),
      el('button', {
        type: 'button', onclick: async () => {
          const body = { checkpoints: checkpoints.value };
          if (samples.value) body.num_samples = String(samples.value);
          if (reference.value) body.reference_stats = reference.value;
          if (inception.value) body.inception_weights = inception.value;
          try {
            const reply = await api(`runs/${id}:evaluate`, { method: 'POST', body });
            dialog.close();
            toast(`queued ${reply.run.id}`);
          } catch (error) { toast(`evaluate ${id}: ${error.message}`, true); }
        },
      }, 'Queue evaluation')));
  document.body.append(dialog);
  dialog.addEventListener('close', () => dialog.remove());
  dialog.showModal();
}
function startDialog() {
  const file = el('input', { type: 'file', accept: '.yaml,.yml' });
  const name = el('input', { type: 'text', placeholder: 'run' });
  const priority = el('input', { type: 'number', min: '0', value: '0' });
  const dialog = el('dialog', {},
    el('h2', { text: 'Start a run' }),
    el('label', { text: 'Config (YAML, as configs/*.yaml)' }), file,
    el('label', { text: 'Name' }), name,
    el('label', { text: 'Priority (higher runs first)' }), priority,
    el('div', { class: 'buttons' },
      el('button', { class: 'secondary', type: 'button', onclick: () => dialog.close() }, 'Cancel'),
      el('button', {
        type: 'button', onclick: async () => {
          if (!file.files.length) { toast('choose a YAML config first', true); return; }
          const body = {
            config_yaml: await file.files[0].text(),
            name: name.value || file.files[0].name.replace(/\.ya?ml$/, '').replace(/[^A-Za-z0-9._-]/g, '-'),
            priority: Number(priority.value || 0),
          };
          try {
            const reply = await api('runs', { method: 'POST', body });
            dialog.close();
            toast(`queued ${reply.run.id}`);
            location.hash = '#/runs/' + reply.run.id;
          } catch (error) { toast(`start: ${error.message}`, true); }
        },
      }, 'Start')));
  document.body.append(dialog);
  dialog.addEventListener('close', () => dialog.remove());
  dialog.showModal();
}

// ---------- the runs page ----------
function runsPage(page) {
  const filter = el('select', { 'aria-label': 'state' },
    el('option', { value: '', text: 'every state' }),
    STATES.map((s) => el('option', { value: s, text: s })));
  filter.value = page.params.get('state') || '';
  filter.addEventListener('change', () => {
    location.hash = '#/runs' + (filter.value ? '?state=' + filter.value : '');
  });
  const body = el('tbody');
  const count = el('span', { class: 'sub' });
  const table = el('table', { id: 'runs' },
    el('thead', {}, el('tr', {},
      ['Run', 'State', 'Progress', 'images/s', 'Loss', 'FID', 'bits/dim', 'Group', 'Restarts', '']
        .map((h, i) => el('th', { class: i >= 3 && i <= 6 || i === 8 ? 'num' : undefined, text: h })))),
    body);
  $('#view').replaceChildren(
    el('div', { class: 'toolbar' },
      el('h1', { text: 'Runs' }), count, el('span', { class: 'spacer' }), filter,
      actButton('Start a run…', '', startDialog)),
    el('div', { class: 'panel' }, table));
  const refresh = async () => {
    const list = await api('runs' + (filter.value ? '?state=' + filter.value : ''), { signal: page.abort.signal });
    const runs = list.runs || [];
    count.textContent = runs.length + (runs.length === 1 ? ' run' : ' runs');
    body.replaceChildren(...runs.slice().reverse().map((run) => {
      const m = run.metrics || {};
      const ended = FINAL.has(run.state);
      return el('tr', { 'data-run': run.id, 'data-state': run.state },
        el('td', {}, el('a', { href: '#/runs/' + run.id, text: run.id }),
          run.kind === 'EVALUATION' ? el('span', { class: 'sub', text: ' evaluation' }) : null),
        el('td', {}, stateBadge(run.state)),
        el('td', {}, progressBar(run)),
        el('td', { class: 'num', text: fmt(m.images_per_second, 3) }),
        el('td', { class: 'num', text: run.kind === 'EVALUATION' ? '-' : fmt(m.loss) }),
        el('td', { class: 'num', text: run.latest_eval ? fmt(run.latest_eval.fid) : '-' }),
        el('td', { class: 'num', text: run.latest_nll ? fmt(run.latest_nll.nll_bits_per_dim) : '-' }),
        el('td', { class: 'mono', text: (run.placement && run.placement.group_id) || '-' }),
        el('td', { class: 'num', text: String(run.restarts || 0) }),
        el('td', {},
          ended ? null : actButton('Stop', 'secondary', () => stopRun(run.id)),
          ' ', run.kind === 'EVALUATION' ? null : actButton('Evaluate', 'secondary', () => evaluateDialog(run.id)),
          ' ', ended ? actButton('Delete', 'danger', () => deleteRun(run.id)) : null));
    }));
    if (!runs.length) body.append(el('tr', {}, el('td', { colspan: 10, class: 'empty', text: 'No runs yet. Start one with ddpmctl start CONFIG or the button above.' })));
    consoleState.updates++;
  };
  page.refresh = throttle(() => refresh().catch(report), 1000);
  refresh().catch(report);
  stream('events', () => { page.refresh(); }, page.abort.signal);
}

// ---------- the groups page ----------
function groupsPage(page) {
  const holder = el('div');
  $('#view').replaceChildren(el('div', { class: 'toolbar' }, el('h1', { text: 'Worker groups' })), holder);
  const refresh = async () => {
    const list = await api('groups', { signal: page.abort.signal });
    const groups = list.groups || [];
    if (!groups.length) {
      holder.replaceChildren(el('div', { class: 'panel empty', text: 'No worker group is registered. Start one: mpirun -np N ddpm_worker --coordinator HOST:PORT' }));
    } else {
      holder.replaceChildren(...groups.map((group) => el('div', { class: 'panel', 'data-group': group.id },
        el('h2', {}, group.id + ' ', el('span', { class: 'sub', text: `${group.world_size} rank(s) · ` }),
          group.run ? el('span', {}, 'busy with ', el('a', { href: '#/runs/' + group.run, text: group.run }))
            : el('span', { class: 'ok', text: 'idle' })),
        el('table', {},
          el('thead', {}, el('tr', {}, ['Rank', 'Host', 'Device', 'Heartbeat', 'Step', 'Step time', 'Exposed all-reduce', 'Device memory']
            .map((h, i) => el('th', { class: i >= 3 ? 'num' : undefined, text: h })))),
          el('tbody', {}, (group.ranks || []).map((rank) => el('tr', {},
            el('td', { text: String(rank.rank || 0) }),
            el('td', { class: 'mono', text: rank.host || '-' }),
            el('td', { class: 'mono', text: rank.device || '-' }),
            el('td', { class: 'num' + ((rank.heartbeat_age_seconds || 0) > 10 ? ' warn' : ''), text: fmt(rank.heartbeat_age_seconds || 0, 2) + ' s ago' }),
            el('td', { class: 'num', text: rank.step ? String(rank.step) : '-' }),
            el('td', { class: 'num', text: rank.step_seconds ? fmt(rank.step_seconds * 1000, 3) + ' ms' : '-' }),
            el('td', { class: 'num', text: rank.exposed_allreduce_seconds ? fmt(rank.exposed_allreduce_seconds * 1000, 3) + ' ms' : '-' }),
            el('td', { class: 'num', text: bytes(rank.device_memory_bytes) }))))))));
    }
    consoleState.updates++;
  };
  page.refresh = throttle(() => refresh().catch(report), 1000);
  refresh().catch(report);
  stream('events', () => { page.refresh(); }, page.abort.signal);
  // Heartbeat ages move without events.
  const ages = setInterval(() => page.refresh(), 5000);
  page.abort.signal.addEventListener('abort', () => clearInterval(ages));
}

// ---------- one run ----------
function runPage(page, id) {
  const head = el('div', { class: 'runhead' });
  const facts = el('div', { class: 'facts' });
  const charts = {
    loss: chartBox(), lr: chartBox(true), grad: chartBox(true), speed: chartBox(true),
    fid: chartBox(), bpd: chartBox(),
  };
  const scoreBody = el('tbody');
  const viewerImg = el('img', { alt: 'sample grid' });
  const slider = el('input', { type: 'range', min: '0', max: '0', value: '0', 'aria-label': 'grid' });
  const sliderLabel = el('div', { class: 'sub' });
  const sweeps = el('div', { class: 'grid3' });
  const plots = el('div', { class: 'plots' });
  const timeline = el('ul', { class: 'timeline' });
  const config = el('pre', { class: 'config' });
  const placement = el('div', { class: 'facts' });
  $('#view').replaceChildren(
    head,
    el('div', { class: 'panel' }, facts),
    el('div', { class: 'grid2' },
      el('div', { class: 'panel' }, charts.loss.box),
      el('div', { class: 'panel' }, el('div', { class: 'grid3' }, charts.lr.box, charts.grad.box, charts.speed.box))),
    el('div', { class: 'grid2' },
      el('div', { class: 'panel' }, charts.fid.box),
      el('div', { class: 'panel' }, charts.bpd.box)),
    el('div', { class: 'panel' }, el('h2', { text: 'Checkpoints' }),
      el('table', { id: 'scorecard' },
        el('thead', {}, el('tr', {}, ['Step', 'Committed', 'Samples', 'FID', 'IS', 'KID', 'bits/dim', 'Path']
          .map((h, i) => el('th', { class: i >= 3 && i <= 6 ? 'num' : undefined, text: h })))),
        scoreBody)),
    el('div', { class: 'panel' }, el('h2', { text: 'Samples across training' }),
      el('div', { class: 'viewer' }, viewerImg, el('div', { class: 'controls' }, slider, sliderLabel))),
    el('div', { class: 'panel' }, el('h2', { text: 'Sweeps' }), sweeps, plots),
    el('div', { class: 'grid2' },
      el('div', { class: 'panel' }, el('h2', { text: 'Transitions' }), timeline),
      el('div', { class: 'panel' }, el('h2', { text: 'Placement' }), placement,
        el('h2', { text: 'Config', style: undefined }), config)));

  const loss = lineChart('loss', charts.loss.canvas, {
    title: 'Training loss (L_simple) and by timestep quartile', log: true,
    datasets: [dataset('loss', '#1c2430', [], { borderWidth: 2 })].concat(
      [0, 1, 2, 3].map((q) => dataset(`q${q}`, QUARTILE_COLORS[q], [], { borderWidth: 1 }))),
  });
  const lr = lineChart('lr', charts.lr.canvas, { title: 'Learning rate', datasets: [dataset('lr', COLORS[0])] });
  const grad = lineChart('grad_norm', charts.grad.canvas, { title: 'Gradient norm', datasets: [dataset('grad norm', COLORS[1])] });
  const speed = lineChart('images_per_second', charts.speed.canvas, { title: 'Images/s', datasets: [dataset('images/s', COLORS[2])] });
  const fid = lineChart('fid', charts.fid.canvas, {
    title: 'FID and Inception Score against step', points: true, tight: true,
    datasets: [dataset('FID', COLORS[0], [], { yAxisID: 'y' }), dataset('IS', COLORS[1], [], { yAxisID: 'y1' })],
  });
  fid.options.scales.y1 = { type: 'linear', position: 'right', grid: { drawOnChartArea: false }, ticks: { maxTicksLimit: 6 } };
  fid.update();
  const bpd = lineChart('bits_per_dim', charts.bpd.canvas, {
    title: 'Bound (bits/dim) against step', points: true, tight: true, datasets: [dataset('bits/dim', COLORS[3])],
  });

  let lastStep = -1;
  let run = null;
  let grids = [];
  const appendHistory = async () => {
    const history = await api(`runs/${id}/metrics?since=${lastStep}`, { signal: page.abort.signal });
    const points = history.points || [];
    if (history.downsampled || lastStep < 0) {
      for (const chart of [loss, lr, grad, speed]) chart.data.datasets.forEach((d) => { d.data = []; });
    }
    for (const p of points) {
      const x = Number(p.step);
      loss.data.datasets[0].data.push({ x, y: p.loss });
      for (let q = 0; q < 4; q++) {
        const v = p.loss_by_quartile && p.loss_by_quartile[q];
        loss.data.datasets[q + 1].data.push({ x, y: typeof v === 'number' && v > 0 ? v : null });
      }
      lr.data.datasets[0].data.push({ x, y: p.lr || 0 });
      grad.data.datasets[0].data.push({ x, y: p.grad_norm || 0 });
      speed.data.datasets[0].data.push({ x, y: p.images_per_second || 0 });
      lastStep = Math.max(lastStep, x);
    }
    if (lastStep < 0) lastStep = 0;
    for (const chart of [loss, lr, grad, speed]) chart.update('none');
  };
  const showGrid = (index) => {
    const grid = grids[index];
    if (!grid) { sliderLabel.textContent = 'No sample grid yet.'; return; }
    runImage(id, grid.path).then((url) => { viewerImg.src = url; }).catch(report);
    sliderLabel.textContent = `step ${grid.step} · ${index + 1} of ${grids.length} grids`;
  };
  slider.addEventListener('input', () => showGrid(Number(slider.value)));
  const refreshCheckpoints = async () => {
    const card = await api(`runs/${id}/checkpoints`, { signal: page.abort.signal });
    const atEnd = Number(slider.value) >= grids.length - 1;
    grids = card.grids || [];
    slider.max = String(Math.max(0, grids.length - 1));
    if (atEnd) slider.value = slider.max;
    showGrid(Number(slider.value));
    const rows = card.rows || [];
    scoreBody.replaceChildren(...rows.slice().reverse().map((row) => {
      const ev = row.eval || {};
      const grid = row.grid;
      const thumb = grid ? imageOf(id, grid.path, {
        class: 'thumb', title: `grid of step ${grid.step}`,
        onclick: () => { slider.value = String(grids.findIndex((g) => g.step === grid.step)); showGrid(Number(slider.value)); },
      }) : el('span', { class: 'sub', text: 'none' });
      const best = run && run.best && String(run.best.step) === String(row.checkpoint.step);
      return el('tr', { 'data-step': row.checkpoint.step, class: best ? 'best' : undefined },
        el('td', { class: 'num' }, String(row.checkpoint.step),
          best ? el('span', { class: 'best-badge', title: `checkpoints/best: the best ${run.best.metric} (eval.select)`, text: 'best' }) : null),
        el('td', { text: when(row.checkpoint.at_unix_ms) }),
        el('td', {}, thumb),
        el('td', { class: 'num fid', 'data-fid': ev.num_samples ? String(ev.fid) : undefined, text: ev.num_samples ? fmt(ev.fid, 6) : '-' }),
        el('td', { class: 'num', text: ev.num_samples ? fmt(ev.inception_score) : '-' }),
        el('td', { class: 'num', text: ev.kid !== undefined ? fmt(ev.kid, 3) : '-' }),
        el('td', { class: 'num', text: ev.nll_bits_per_dim !== undefined ? fmt(ev.nll_bits_per_dim) : '-' }),
        el('td', { class: 'mono sub', text: row.checkpoint.path }));
    }));
    if (!rows.length) scoreBody.append(el('tr', {}, el('td', { colspan: 8, class: 'empty', text: 'No checkpoint has committed yet.' })));
  };
  const refreshEvaluations = async () => {
    const result = await api(`runs/${id}/evaluations`, { signal: page.abort.signal });
    const evals = result.evaluations || [];
    fid.data.datasets[0].data = evals.filter((e) => Number(e.num_samples) > 0).map((e) => ({ x: Number(e.step), y: e.fid }));
    fid.data.datasets[1].data = evals.filter((e) => Number(e.num_samples) > 0).map((e) => ({ x: Number(e.step), y: e.inception_score }));
    bpd.data.datasets[0].data = evals.filter((e) => e.nll_bits_per_dim !== undefined).map((e) => ({ x: Number(e.step), y: e.nll_bits_per_dim }));
    bpd.options.plugins.title.text = 'Bound (bits/dim) against step' +
      (bpd.data.datasets[0].data.length ? '' : ': not measured yet (eval.nll_every)');
    fid.options.plugins.title.text = 'FID and Inception Score against step' +
      (fid.data.datasets[0].data.length ? '' : ': not measured yet (eval.every)');
    fid.update('none');
    bpd.update('none');
    const list = (result.sweeps || []).filter((s) => s.source !== 'training');
    for (const key of Object.keys(consoleState.charts)) {
      if (key.startsWith('sweep:')) { consoleState.charts[key].destroy(); delete consoleState.charts[key]; }
    }
    sweeps.replaceChildren(...list.map((sweep, i) => {
      const box = chartBox(true);
      const title = `FID against ${sweep.against.replace('_', ' ')} · ${sweep.source}`;
      setTimeout(() => lineChart(`sweep:${i}`, box.canvas, {
        title, x: sweep.against.replace('_', ' '), points: true,
        datasets: [dataset('FID', COLORS[i % COLORS.length], (sweep.points || []).map((p) => ({ x: p.x || 0, y: p.fid })))],
      }));
      return el('div', {}, box.box);
    }));
    if (!list.length) sweeps.append(el('div', { class: 'empty', text: 'No evaluation job or sweep yet: ddpmctl eval RUN --checkpoint all, ddpm_phema, or ddpm_fid guidance sweeps written under the run directory.' }));
    plots.replaceChildren(...(result.plots || []).map((path) => el('figure', {}, imageOf(id, path), el('figcaption', { text: path }))));
  };
  let headState = '';
  const showRun = (r) => {
    run = r;
    const m = r.metrics || {};
    // The buttons are redrawn only when the state changes (a click must not land on a button
    // being replaced); between, only the progress bar moves.
    if (r.state === headState) {
      head.querySelector('.progress').replaceWith(progressBar(r));
    } else {
    headState = r.state;
    head.replaceChildren(...[
      el('div', {}, el('h1', { text: r.id }), el('div', { class: 'sub', text: `${r.kind === 'EVALUATION' ? 'evaluation job' : 'training run'} · ${r.run_dir}` })),
      stateBadge(r.state), progressBar(r), el('span', { class: 'spacer' }),
      FINAL.has(r.state) ? null : actButton('Stop', 'secondary', () => stopRun(r.id)),
      r.kind === 'EVALUATION' ? null : actButton('Evaluate', 'secondary', () => evaluateDialog(r.id)),
      FINAL.has(r.state) ? actButton('Delete', 'danger', () => deleteRun(r.id)) : null].filter(Boolean));
    head.querySelector('h1').id = 'run-title';
    }
    const fact = (k, v) => el('div', { class: 'fact' }, el('div', { class: 'k', text: k }), el('div', { class: 'v', text: v }));
    facts.replaceChildren(
      fact('step', `${m.step || 0} / ${r.total_steps || '?'}`),
      fact('loss', fmt(m.loss)), fact('images/s', fmt(m.images_per_second, 3)),
      fact('ETA', r.state === 'RUNNING' ? duration(m.eta_seconds) : '-'),
      fact('FID', r.latest_eval ? fmt(r.latest_eval.fid) : '-'),
      fact('IS', r.latest_eval ? fmt(r.latest_eval.inception_score) : '-'),
      fact('bits/dim', r.latest_nll ? fmt(r.latest_nll.nll_bits_per_dim) : '-'),
      ...(r.latest_eval && r.latest_eval.kid !== undefined ? [fact('KID', fmt(r.latest_eval.kid, 3))] : []),
      ...(r.latest_eval && r.latest_eval.precision !== undefined
        ? [fact('precision / recall', `${fmt(r.latest_eval.precision, 3)} / ${fmt(r.latest_eval.recall || 0, 3)}`)] : []),
      ...(r.best ? [fact('best', `${r.best.metric} ${fmt(r.best.score)} @ ${r.best.step}`)] : []),
      fact('restarts', `${r.restarts || 0} of ${r.max_restarts || 0}`),
      fact('reason', r.reason || '-'));
    facts.lastChild.querySelector('.v').style.fontSize = '12px';
    timeline.replaceChildren(...(r.transitions || []).slice().reverse().map((t) => el('li', { class: t.to },
      el('div', {}, stateBadge(t.to), ' ', t.reason), el('div', { class: 'when', text: when(t.at_unix_ms) }))));
    const p = r.placement || {};
    const world = p.world_size || 0, micro = p.micro_batch || 0, accum = p.micro_batches || 1;
    placement.replaceChildren(
      fact('group', p.group_id || '-'), fact('ranks', String(world || '-')),
      fact('micro-batch', String(micro || '-')), fact('micro-batches', String(accum)),
      fact('global batch', world ? `${world} × ${accum} × ${micro} = ${micro * world * accum}` : '-'),
      fact('attempt', String(p.attempt || '-')));
    config.textContent = r.config_yaml || '';
  };
  const refreshAll = async () => {
    const r = (await api(`runs/${id}`, { signal: page.abort.signal })).run;
    showRun(r);
    await Promise.all([appendHistory(), refreshCheckpoints(), refreshEvaluations()]);
  };
  const checkpointsLater = throttle(() => refreshCheckpoints().catch(report), 2000);
  const evaluationsLater = throttle(() => refreshEvaluations().catch(report), 2000);
  const historyLater = throttle(() => appendHistory().catch(report), 1000);
  refreshAll().then(() => {
    let seenCheckpoint = run && run.latest_checkpoint ? run.latest_checkpoint.step : 0;
    let seenGrid = run ? run.sample_grid : '';
    let seenEval = run ? JSON.stringify([run.latest_eval, run.latest_nll]) : '';
    stream(`runs/${id}/watch`, (name, event) => {
      if (name === 'end') {
        $('#live').textContent = 'run ended';
        $('#live').className = 'live';
        return false;
      }
      const r = event.run;
      showRun(r);
      consoleState.updates++;
      if (event.metrics) historyLater();
      const checkpoint = r.latest_checkpoint ? r.latest_checkpoint.step : 0;
      if (checkpoint !== seenCheckpoint || r.sample_grid !== seenGrid) {
        seenCheckpoint = checkpoint;
        seenGrid = r.sample_grid;
        checkpointsLater();
      }
      const evals = JSON.stringify([r.latest_eval, r.latest_nll]);
      if (evals !== seenEval || (r.evaluation && event.metrics)) {
        seenEval = evals;
        evaluationsLater();
        checkpointsLater();
      }
      return true;
    }, page.abort.signal);
  }).catch(report);
}

function report(error) {
  if (error && error.name === 'AbortError') return;
  if (error && error.status === 401) return;
  const message = error && error.message ? error.message : String(error);
  if (error && error.status === 404 && current) {
    $('#view').replaceChildren(el('div', { class: 'panel error', text: message }));
    return;
  }
  toast(message, true);
}

// ---------- routing ----------
function route() {
  if (!session.token) return;
  if (current) current.abort.abort();
  for (const chart of Object.values(consoleState.charts)) chart.destroy();
  consoleState.charts = {};
  const hash = location.hash || '#/runs';
  const [path, query] = hash.slice(1).split('?');
  const page = { abort: new AbortController(), params: new URLSearchParams(query || '') };
  current = page;
  consoleState.route = path;
  const parts = path.split('/').filter(Boolean);
  for (const link of document.querySelectorAll('header nav a')) {
    link.classList.toggle('active', link.dataset.route === parts[0]);
  }
  if (parts[0] === 'groups') groupsPage(page);
  else if (parts[0] === 'runs' && parts[1]) runPage(page, decodeURIComponent(parts[1]));
  else runsPage(page);
}

document.addEventListener('DOMContentLoaded', () => {
  if (window.Chart) {
    Chart.defaults.font.family = getComputedStyle(document.documentElement).fontFamily;
    Chart.defaults.color = '#4a5566';
  }
  $('#login-form').addEventListener('submit', (event) => {
    event.preventDefault();
    signIn($('#token').value.trim());
  });
  $('#signout').addEventListener('click', () => signOut(''));
  window.addEventListener('hashchange', route);
  signOut('');
});
