/*
 * rdmaps_module.c -- the Python binding of librdmaps: the extension
 * rdmaps._rdmaps, whose names the package `rdmaps` re-exports (rdmaps/__init__.py).
 *
 *   c = rdmaps.Client(host, port='7471', token=None, src=None, timeout_ms=5000)
 *   c = rdmaps.Client(servers='h1:7471,h2:7471', token=...)   # several shards
 *   t = c.declare('w', n, init=None, init_value=0.0, optimizer='sgd', lr=0.01, ...)
 *   buf = c.register(rdmaps.zeros(n))     # registered once, zero-copy from then on
 *   c.pull(t, buf); c.push(t, grad)       # numpy float32, C-contiguous, n elements
 *   op = c.pull_async(t, buf); op.wait()  # or op.test()
 *
 * Arrays: numpy.ndarray, dtype float32 in native byte order (else TypeError),
 * C-contiguous, aligned, writeable for pulls and registration, exactly the
 * tensor's number of elements (else ValueError). Nothing is copied: the
 * library reads and writes the array's own memory (through the NIC when it
 * lies in a registered array, else through librdmaps' bounce buffer).
 *
 * Errors from the library raise rdmaps.Error: .code (negative, equal to one
 * of the rdmaps.E* constants), .name ("RDMAPS_ENOENT"), .strerror (the
 * rdmaps_strerror text, also in str(e)).
 *
 * Threads: every blocking call releases the GIL. A client is used by one
 * thread at a time (librdmaps' rule); the binding enforces it with a lock,
 * so sharing a Client between threads is safe, just serialised.
 *
 * fork(): see fork_setup() below and docs/training.md.
 *
 * SPDX-License-Identifier: BSD-2-Clause
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>

#define NPY_NO_DEPRECATED_API NPY_1_7_API_VERSION
#include <numpy/arrayobject.h>

#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include <infiniband/verbs.h>

#include "rdmaps.h"

PyMODINIT_FUNC PyInit__rdmaps(void);

static PyObject *RdmapsError;
static PyTypeObject ClientType, TensorType, OpType;

/* ---- errors ----------------------------------------------------------- */

/* Raise rdmaps.Error for a librdmaps return code; returns NULL. */
static PyObject *raise_rdmaps(int rc, const char *what)
{
	PyObject *exc, *v;

	exc = PyObject_CallFunction(RdmapsError, "s", rdmaps_strerror(rc));
	if (!exc)
		return NULL;
	v = PyUnicode_FromFormat("%s: %s (%s)", what, rdmaps_strerror(rc), rdmaps_err_name(rc));
	if (v) {
		/* str(e) gives the context; e.strerror the bare library text */
		PyObject *args = PyTuple_Pack(1, v);
		if (args) {
			PyObject_SetAttrString(exc, "args", args);
			Py_DECREF(args);
		}
		Py_DECREF(v);
	}
	v = PyLong_FromLong(rc);
	if (v) {
		PyObject_SetAttrString(exc, "code", v);
		Py_DECREF(v);
	}
	v = PyUnicode_FromString(rdmaps_err_name(rc));
	if (v) {
		PyObject_SetAttrString(exc, "name", v);
		Py_DECREF(v);
	}
	v = PyUnicode_FromString(rdmaps_strerror(rc));
	if (v) {
		PyObject_SetAttrString(exc, "strerror", v);
		Py_DECREF(v);
	}
	PyErr_SetObject(RdmapsError, exc);
	Py_DECREF(exc);
	return NULL;
}

/* ---- arrays ----------------------------------------------------------- */

/*
 * Check obj is a float32 ndarray usable as an rdmaps buffer of `length`
 * elements (length 0: any size). Returns its data pointer, or NULL with
 * TypeError/ValueError set.
 */
/* The data of a C-contiguous, aligned array of `length` elements whose
 * dtype is one of types[0..ntypes) (named `tname` in errors), or NULL with
 * a Python error set. */
static void *array_data_of(PyObject *obj, int writable, uint64_t length, const char *what,
			   const int *types, int ntypes, const char *tname)
{
	PyArrayObject *a;
	int ok = 0;

	if (!PyArray_Check(obj)) {
		PyErr_Format(PyExc_TypeError, "%s must be a numpy.ndarray of %s, not %.100s", what,
			     tname, Py_TYPE(obj)->tp_name);
		return NULL;
	}
	a = (PyArrayObject *)obj;
	for (int i = 0; i < ntypes; i++)
		ok |= PyArray_TYPE(a) == types[i];
	if (!ok || !PyArray_ISNOTSWAPPED(a)) {
		PyObject *r = PyObject_Repr((PyObject *)PyArray_DESCR(a));
		PyErr_Format(PyExc_TypeError, "%s must have dtype %s in native byte order, not %U",
			     what, tname, r);
		Py_XDECREF(r);
		return NULL;
	}
	if (!PyArray_IS_C_CONTIGUOUS(a)) {
		PyErr_Format(PyExc_ValueError, "%s must be C-contiguous (use numpy.ascontiguousarray)",
			     what);
		return NULL;
	}
	if (!PyArray_ISALIGNED(a)) {
		PyErr_Format(PyExc_ValueError, "%s must be aligned", what);
		return NULL;
	}
	if (writable && !PyArray_ISWRITEABLE(a)) {
		PyErr_Format(PyExc_ValueError, "%s must be writeable", what);
		return NULL;
	}
	if (length && (uint64_t)PyArray_SIZE(a) != length) {
		PyErr_Format(PyExc_ValueError, "%s has %zd elements, the tensor has %llu", what,
			     PyArray_SIZE(a), (unsigned long long)length);
		return NULL;
	}
	if (!length && PyArray_SIZE(a) == 0) {
		PyErr_Format(PyExc_ValueError, "%s is empty", what);
		return NULL;
	}
	return PyArray_DATA(a);
}

static float *array_data(PyObject *obj, int writable, uint64_t length, const char *what)
{
	static const int f32[] = { NPY_FLOAT32 };

	return array_data_of(obj, writable, length, what, f32, 1, "float32");
}

/* ---- Client ----------------------------------------------------------- */

struct reg {
	struct reg *next;
	PyObject *arr;   /* strong reference: the memory outlives its registration */
	rdmaps_mr *mr;
};

typedef struct {
	PyObject_HEAD
	rdmaps_client *c;          /* NULL once closed */
	PyThread_type_lock lock;   /* one thread at a time inside librdmaps */
	pid_t pid;                 /* the process that owns the connection */
	struct reg *regs;
	Py_ssize_t pending;        /* async ops not yet reported complete */
	PyObject *host, *port;
} ClientObject;

typedef struct {
	PyObject_HEAD
	ClientObject *client;
	rdmaps_tensor *t;          /* owned by the client's connection */
	PyObject *name;
	uint64_t length;
} TensorObject;

typedef struct {
	PyObject_HEAD
	ClientObject *client;
	rdmaps_op *op;
	PyObject *arr;             /* kept alive until the NIC is done with it */
	const char *kind;          /* "pull" / "push" */
	int done, status;
} OpObject;

/*
 * Take the client for a librdmaps call: the owning process only, not
 * closed, and its lock. The lock is taken with the GIL released when another
 * thread holds it (that thread needs the GIL back to finish). Returns 0, or
 * -1 with an exception set.
 */
static int client_enter(ClientObject *self)
{
	if (self->pid != getpid()) {
		PyErr_Format(PyExc_RuntimeError,
			     "this rdmaps.Client belongs to process %d; after fork() the child "
			     "must open its own Client", (int)self->pid);
		return -1;
	}
	if (!PyThread_acquire_lock(self->lock, NOWAIT_LOCK)) {
		Py_BEGIN_ALLOW_THREADS
		PyThread_acquire_lock(self->lock, WAIT_LOCK);
		Py_END_ALLOW_THREADS
	}
	if (!self->c) {
		PyThread_release_lock(self->lock);
		PyErr_SetString(PyExc_ValueError, "rdmaps.Client is closed");
		return -1;
	}
	return 0;
}

static void client_leave(ClientObject *self)
{
	PyThread_release_lock(self->lock);
}

static int Client_init(ClientObject *self, PyObject *args, PyObject *kw)
{
	static char *kwlist[] = { "host", "port", "token", "src", "timeout_ms", "servers", "config",
				  NULL };
	PyObject *port_obj = NULL, *port_str = NULL;
	const char *host = NULL, *token = NULL, *src = NULL, *port, *servers = NULL, *config = NULL;
	int timeout_ms = 5000, rc;
	rdmaps_client *c = NULL;

	if (self->c) {
		PyErr_SetString(PyExc_RuntimeError, "Client already initialised");
		return -1;
	}
	if (!PyArg_ParseTupleAndKeywords(args, kw, "|zOzzizz:Client", kwlist, &host, &port_obj,
					 &token, &src, &timeout_ms, &servers, &config))
		return -1;
	if (host && (servers || config)) {
		PyErr_SetString(PyExc_TypeError, "Client: give host (one server) or servers/config "
						 "(a cluster), not both");
		return -1;
	}
	if (!port_obj || port_obj == Py_None)
		port_str = PyUnicode_FromString("7471");
	else if (PyLong_Check(port_obj) || PyUnicode_Check(port_obj))
		port_str = PyObject_Str(port_obj);
	else
		PyErr_SetString(PyExc_TypeError, "port must be an int or a str");
	if (!port_str)
		return -1;
	port = PyUnicode_AsUTF8(port_str);
	if (!port) {
		Py_DECREF(port_str);
		return -1;
	}
	if (timeout_ms < 0) {
		Py_DECREF(port_str);
		PyErr_SetString(PyExc_ValueError, "timeout_ms must be >= 0");
		return -1;
	}
	if (!self->lock && !(self->lock = PyThread_allocate_lock())) {
		Py_DECREF(port_str);
		PyErr_NoMemory();
		return -1;
	}
	struct rdmaps_connect_opts o = {
		.host = host, .port = port, .src_addr = src, .token = token, .timeout_ms = timeout_ms,
	};
	/* no host: a cluster, from servers/config or else RDMAPS_* and $RDMAPS_CONFIG */
	struct rdmaps_cluster_opts co = {
		.config = config, .servers = servers, .src_addr = src, .token = token,
		.timeout_ms = timeout_ms,
	};
	Py_BEGIN_ALLOW_THREADS
	rc = host ? rdmaps_connect(&o, &c) : rdmaps_connect_cluster(&co, &c);
	Py_END_ALLOW_THREADS
	if (rc) {
		Py_DECREF(port_str);
		raise_rdmaps(rc, "connect");
		return -1;
	}
	self->c = c;
	self->pid = getpid();
	Py_XSETREF(self->host, PyUnicode_FromString(host ? host : servers ? servers : "(cluster)"));
	Py_XSETREF(self->port, port_str);
	return 0;
}

/* Free the connection (owning process only) and drop the array references. */
static void client_shutdown(ClientObject *self)
{
	rdmaps_client *c = self->c;
	struct reg *r = self->regs;

	self->c = NULL;
	self->regs = NULL;
	if (c && self->pid == getpid()) {
		/* frees every registration too, before the arrays are released */
		Py_BEGIN_ALLOW_THREADS
		rdmaps_close(c);
		Py_END_ALLOW_THREADS
	}
	/*
	 * In a forked child the connection is the parent's: its file descriptors
	 * and queue pairs are shared with the parent, so closing them here would
	 * tear down the parent's connection. The child just forgets it.
	 */
	while (r) {
		struct reg *n = r->next;
		Py_DECREF(r->arr);
		free(r);
		r = n;
	}
}

static PyObject *Client_close(ClientObject *self, PyObject *unused)
{
	(void)unused;
	if (!self->c)
		Py_RETURN_NONE;
	if (self->pid == getpid()) {
		if (!PyThread_acquire_lock(self->lock, NOWAIT_LOCK)) {
			Py_BEGIN_ALLOW_THREADS
			PyThread_acquire_lock(self->lock, WAIT_LOCK);
			Py_END_ALLOW_THREADS
		}
		client_shutdown(self);
		PyThread_release_lock(self->lock);
	} else {
		client_shutdown(self);
	}
	Py_RETURN_NONE;
}

static void Client_dealloc(ClientObject *self)
{
	/* Tensors and Ops hold references to us: nobody else can be inside */
	client_shutdown(self);
	if (self->lock)
		PyThread_free_lock(self->lock);
	Py_XDECREF(self->host);
	Py_XDECREF(self->port);
	Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *Client_repr(ClientObject *self)
{
	return PyUnicode_FromFormat("<rdmaps.Client %R port %R%s>", self->host ? self->host : Py_None,
				    self->port ? self->port : Py_None, self->c ? "" : " closed");
}

static PyObject *Client_enter_ctx(ClientObject *self, PyObject *unused)
{
	(void)unused;
	Py_INCREF(self);
	return (PyObject *)self;
}

static PyObject *Client_exit_ctx(ClientObject *self, PyObject *args)
{
	(void)args;
	PyObject *r = Client_close(self, NULL);
	if (!r)
		return NULL;
	Py_DECREF(r);
	Py_RETURN_FALSE;
}

static PyObject *new_tensor(ClientObject *self, rdmaps_tensor *t, const char *name)
{
	TensorObject *to = PyObject_New(TensorObject, &TensorType);

	if (!to)
		return NULL;
	Py_INCREF(self);
	to->client = self;
	to->t = t;
	to->length = rdmaps_tensor_length(t);
	to->name = PyUnicode_FromString(name);
	if (!to->name) {
		Py_DECREF(to);
		return NULL;
	}
	return (PyObject *)to;
}

static const char *const opt_names[] = { "sgd", "momentum", "nesterov", "adagrad", "adam", "adamw" };

static PyObject *Client_declare(ClientObject *self, PyObject *args, PyObject *kw)
{
	static char *kwlist[] = { "name", "length", "init", "init_value", "optimizer", "lr",
				  "momentum", "beta1", "beta2", "eps", "weight_decay", "consistency",
				  "staleness", "workers", "aggregate_mean", "clip_norm", "pull_format",
				  NULL };
	static const char *const cons_names[] = { "asp", "bsp", "ssp" };
	static const char *const pull_names[] = { "f32", "bf16", "fp16" };
	const char *name, *opt = "sgd", *cons = "asp", *pull = "f32";
	long long length;
	PyObject *init = Py_None;
	float init_value = 0.0f, lr = 0.01f, momentum = 0.0f, beta1 = 0.0f, beta2 = 0.0f,
	      eps = 0.0f, wd = 0.0f, clip = 0.0f;
	unsigned int staleness = 0, members = 0;
	int agg_mean = 0, cn = -1, pf = -1;
	const float *init_data = NULL;
	rdmaps_tensor *t = NULL;
	int o = -1, rc;

	if (!PyArg_ParseTupleAndKeywords(args, kw, "sL|Ofsffffff$sIIpfs:declare", kwlist, &name,
					 &length, &init, &init_value, &opt, &lr, &momentum, &beta1,
					 &beta2, &eps, &wd, &cons, &staleness, &members, &agg_mean,
					 &clip, &pull))
		return NULL;
	for (int i = 0; i < 3; i++)
		if (!strcmp(pull, pull_names[i]))
			pf = i;
	if (pf < 0) {
		PyErr_Format(PyExc_ValueError, "unknown pull_format '%s' (f32, bf16, fp16)", pull);
		return NULL;
	}
	for (size_t i = 0; i < sizeof(cons_names) / sizeof(cons_names[0]); i++)
		if (!strcmp(cons, cons_names[i]))
			cn = (int)i;
	if (cn < 0) {
		PyErr_Format(PyExc_ValueError, "unknown consistency '%s' (asp, bsp, ssp)", cons);
		return NULL;
	}
	if (length <= 0) {
		PyErr_SetString(PyExc_ValueError, "length must be positive");
		return NULL;
	}
	for (size_t i = 0; i < sizeof(opt_names) / sizeof(opt_names[0]); i++)
		if (!strcmp(opt, opt_names[i]))
			o = (int)i;
	if (o < 0) {
		PyErr_Format(PyExc_ValueError,
			     "unknown optimizer '%s' (sgd, momentum, nesterov, adagrad, adam, adamw)",
			     opt);
		return NULL;
	}
	if (init != Py_None && !(init_data = array_data(init, 0, (uint64_t)length, "init")))
		return NULL;
	struct rdmaps_tensor_desc d = {
		.name = name, .length = (uint64_t)length, .init = init_data, .init_value = init_value,
		.optimizer = (enum rdmaps_optimizer)o, .lr = lr, .momentum = momentum,
		.beta1 = beta1, .beta2 = beta2, .eps = eps, .weight_decay = wd,
		.consistency = (enum rdmaps_consistency)cn, .staleness = staleness, .workers = members,
		.aggregate_mean = agg_mean, .clip_norm = clip,
		.pull_format = (enum rdmaps_format)pf,
	};
	if (client_enter(self))
		return NULL;
	Py_BEGIN_ALLOW_THREADS
	rc = rdmaps_declare(self->c, &d, &t);
	Py_END_ALLOW_THREADS
	client_leave(self);
	if (rc)
		return raise_rdmaps(rc, "declare");
	return new_tensor(self, t, name);
}

static PyObject *Client_lookup(ClientObject *self, PyObject *args)
{
	const char *name;
	rdmaps_tensor *t = NULL;
	int rc;

	if (!PyArg_ParseTuple(args, "s:lookup", &name))
		return NULL;
	if (client_enter(self))
		return NULL;
	Py_BEGIN_ALLOW_THREADS
	rc = rdmaps_lookup(self->c, name, &t);
	Py_END_ALLOW_THREADS
	client_leave(self);
	if (rc)
		return raise_rdmaps(rc, "lookup");
	return new_tensor(self, t, name);
}

static PyObject *Client_register(ClientObject *self, PyObject *arr)
{
	struct reg *r;
	float *p;
	int rc;

	if (!(p = array_data(arr, 1, 0, "array")))
		return NULL;
	if (client_enter(self))
		return NULL;
	for (r = self->regs; r; r = r->next)
		if (r->arr == arr) { /* registered once: a second call is a no-op */
			client_leave(self);
			Py_INCREF(arr);
			return arr;
		}
	r = calloc(1, sizeof(*r));
	if (!r) {
		client_leave(self);
		return PyErr_NoMemory();
	}
	size_t len = (size_t)PyArray_NBYTES((PyArrayObject *)arr);
	Py_BEGIN_ALLOW_THREADS
	rc = rdmaps_register(self->c, p, len, &r->mr);
	Py_END_ALLOW_THREADS
	if (rc) {
		client_leave(self);
		free(r);
		return raise_rdmaps(rc, "register");
	}
	Py_INCREF(arr);
	r->arr = arr;
	r->next = self->regs;
	self->regs = r;
	client_leave(self);
	Py_INCREF(arr);
	return arr;
}

static PyObject *Client_deregister(ClientObject *self, PyObject *arr)
{
	struct reg **pp, *r;

	if (client_enter(self))
		return NULL;
	for (pp = &self->regs; *pp && (*pp)->arr != arr; pp = &(*pp)->next)
		;
	if (!*pp) {
		client_leave(self);
		PyErr_SetString(PyExc_ValueError, "array is not registered with this client");
		return NULL;
	}
	if (self->pending) {
		/* an op may be using it; the NIC must be done before we unpin */
		client_leave(self);
		return raise_rdmaps(RDMAPS_EBUSY, "deregister (wait for pending ops first)");
	}
	r = *pp;
	*pp = r->next;
	rdmaps_deregister(r->mr);
	client_leave(self);
	Py_DECREF(r->arr);
	free(r);
	Py_RETURN_NONE;
}

/* Parse (tensor, array, flag) for pull/push; returns the data pointer or NULL. */
static float *op_args(ClientObject *self, PyObject *args, PyObject *kw, const char *fmt,
		      const char *flagname, int writable, TensorObject **t, PyObject **arr, int *flag)
{
	char *kwlist[] = { "tensor", "array", (char *)flagname, NULL };

	*flag = 0;
	if (!PyArg_ParseTupleAndKeywords(args, kw, fmt, kwlist, &TensorType, t, arr, flag))
		return NULL;
	if ((*t)->client != self) {
		PyErr_SetString(PyExc_ValueError, "tensor belongs to another Client");
		return NULL;
	}
	return array_data(*arr, writable, (*t)->length, writable ? "out" : "grad");
}

static PyObject *Client_pull(ClientObject *self, PyObject *args, PyObject *kw)
{
	TensorObject *t;
	PyObject *arr;
	int relaxed, rc;
	float *p = op_args(self, args, kw, "O!O|p:pull", "relaxed", 1, &t, &arr, &relaxed);

	if (!p || client_enter(self))
		return NULL;
	Py_BEGIN_ALLOW_THREADS
	rc = rdmaps_pull(self->c, t->t, p, relaxed ? RDMAPS_PULL_RELAXED : 0);
	Py_END_ALLOW_THREADS
	client_leave(self);
	if (rc)
		return raise_rdmaps(rc, "pull");
	Py_INCREF(arr);
	return arr;
}

static PyObject *Client_pull_half(ClientObject *self, PyObject *args, PyObject *kw)
{
	static char *kwlist[] = { "tensor", "out", "relaxed", NULL };
	static const int h16[] = { NPY_UINT16, NPY_FLOAT16 };
	TensorObject *t;
	PyObject *arr;
	int relaxed = 0, rc;
	uint16_t *p;

	if (!PyArg_ParseTupleAndKeywords(args, kw, "O!O|p:pull_half", kwlist, &TensorType, &t,
					 &arr, &relaxed))
		return NULL;
	if (t->client != self) {
		PyErr_SetString(PyExc_ValueError, "tensor belongs to another Client");
		return NULL;
	}
	p = array_data_of(arr, 1, t->length, "out", h16, 2, "uint16 or float16");
	if (!p)
		return NULL;
	/* float16 is IEEE half: a bf16 copy's bits would read as other numbers */
	if (PyArray_TYPE((PyArrayObject *)arr) == NPY_FLOAT16 &&
	    rdmaps_pull_format(t->t) != RDMAPS_FMT_FP16) {
		PyErr_SetString(PyExc_TypeError, "pull_half: out is float16 but the tensor's copy is "
						 "not fp16 (bfloat16 goes into uint16)");
		return NULL;
	}
	if (client_enter(self))
		return NULL;
	Py_BEGIN_ALLOW_THREADS
	rc = rdmaps_pull_half(self->c, t->t, p, relaxed ? RDMAPS_PULL_RELAXED : 0);
	Py_END_ALLOW_THREADS
	client_leave(self);
	if (rc)
		return raise_rdmaps(rc, "pull_half");
	Py_INCREF(arr);
	return arr;
}

static PyObject *Client_push(ClientObject *self, PyObject *args, PyObject *kw)
{
	TensorObject *t;
	PyObject *arr;
	int folded, rc;
	float *p = op_args(self, args, kw, "O!O|p:push", "folded", 0, &t, &arr, &folded);

	if (!p || client_enter(self))
		return NULL;
	Py_BEGIN_ALLOW_THREADS
	rc = rdmaps_push(self->c, t->t, p, folded ? RDMAPS_PUSH_FOLDED : 0);
	Py_END_ALLOW_THREADS
	client_leave(self);
	if (rc)
		return raise_rdmaps(rc, "push");
	Py_RETURN_NONE;
}

static PyObject *start_async(ClientObject *self, PyObject *args, PyObject *kw, int is_pull)
{
	TensorObject *t;
	PyObject *arr;
	int flag, rc;
	rdmaps_op *op = NULL;
	float *p = is_pull ? op_args(self, args, kw, "O!O|p:pull_async", "relaxed", 1, &t, &arr, &flag)
			   : op_args(self, args, kw, "O!O|p:push_async", "folded", 0, &t, &arr, &flag);
	OpObject *o;

	if (!p)
		return NULL;
	o = PyObject_New(OpObject, &OpType);
	if (!o)
		return NULL;
	o->client = NULL;
	o->arr = NULL;
	o->op = NULL;
	o->done = 1;
	o->status = 0;
	o->kind = is_pull ? "pull" : "push";
	if (client_enter(self)) {
		Py_DECREF(o);
		return NULL;
	}
	/* posting does not block: no need to drop the GIL */
	rc = is_pull ? rdmaps_pull_async(self->c, t->t, p, flag ? RDMAPS_PULL_RELAXED : 0, &op)
		     : rdmaps_push_async(self->c, t->t, p, flag ? RDMAPS_PUSH_FOLDED : 0, &op);
	if (!rc)
		self->pending++;
	client_leave(self);
	if (rc) {
		Py_DECREF(o);
		return raise_rdmaps(rc, is_pull ? "pull_async" : "push_async");
	}
	Py_INCREF(self);
	Py_INCREF(arr);
	o->client = self;
	o->arr = arr;
	o->op = op;
	o->done = 0;
	return (PyObject *)o;
}

static PyObject *Client_pull_async(ClientObject *self, PyObject *args, PyObject *kw)
{
	return start_async(self, args, kw, 1);
}

static PyObject *Client_push_async(ClientObject *self, PyObject *args, PyObject *kw)
{
	return start_async(self, args, kw, 0);
}

static PyObject *Client_flush(ClientObject *self, PyObject *args, PyObject *kw)
{
	static char *kwlist[] = { "timeout_ms", NULL };
	int timeout_ms = -1, rc;

	if (!PyArg_ParseTupleAndKeywords(args, kw, "|i:flush", kwlist, &timeout_ms))
		return NULL;
	if (client_enter(self))
		return NULL;
	Py_BEGIN_ALLOW_THREADS
	rc = rdmaps_flush(self->c, timeout_ms);
	Py_END_ALLOW_THREADS
	client_leave(self);
	if (rc)
		return raise_rdmaps(rc, "flush");
	Py_RETURN_NONE;
}

/* A stats struct of uint64_t fields as a dict, field by field by name. */
struct u64_field {
	const char *name;
	size_t off;
};
#define U64_FIELD(T, f) { #f, offsetof(struct T, f) }
#define SERVER_FIELD(f) U64_FIELD(rdmaps_server_stats, f)
#define CLIENT_FIELD(f) U64_FIELD(rdmaps_client_stats, f)

static const struct u64_field server_fields[] = {
#define SERVER_ENTRY(f) SERVER_FIELD(f),
	RDMAPS_SERVER_STATS_MAP(SERVER_ENTRY)
#undef SERVER_ENTRY
};
static const struct u64_field client_fields[] = {
	CLIENT_FIELD(pulls), CLIENT_FIELD(pushes), CLIENT_FIELD(pull_retries),
	CLIENT_FIELD(bounce_copies), CLIENT_FIELD(stale_retries), CLIENT_FIELD(reconnects),
	CLIENT_FIELD(lost_pushes), CLIENT_FIELD(reads), CLIENT_FIELD(server_restarts),
	CLIENT_FIELD(resent_slots), CLIENT_FIELD(push_bytes), CLIENT_FIELD(snapshots),
	CLIENT_FIELD(failovers),
};
/* every field named: a field added to rdmaps.h must be added here */
_Static_assert(sizeof(server_fields) / sizeof(server_fields[0]) * sizeof(uint64_t) ==
		       sizeof(struct rdmaps_server_stats), "server stats fields");
_Static_assert(sizeof(client_fields) / sizeof(client_fields[0]) * sizeof(uint64_t) ==
		       sizeof(struct rdmaps_client_stats), "client stats fields");

static PyObject *u64_dict(const struct u64_field *f, size_t n, const void *st)
{
	PyObject *d = PyDict_New();

	for (size_t i = 0; d && i < n; i++) {
		uint64_t v;
		memcpy(&v, (const char *)st + f[i].off, sizeof(v));
		PyObject *x = PyLong_FromUnsignedLongLong(v);
		if (!x || PyDict_SetItemString(d, f[i].name, x)) {
			Py_XDECREF(x);
			Py_CLEAR(d);
			break;
		}
		Py_DECREF(x);
	}
	return d;
}

static PyObject *Client_server_stats(ClientObject *self, PyObject *unused)
{
	struct rdmaps_server_stats s;
	int rc;

	(void)unused;
	if (client_enter(self))
		return NULL;
	Py_BEGIN_ALLOW_THREADS
	rc = rdmaps_server_stats(self->c, &s);
	Py_END_ALLOW_THREADS
	client_leave(self);
	if (rc)
		return raise_rdmaps(rc, "server_stats");
	return u64_dict(server_fields, sizeof(server_fields) / sizeof(server_fields[0]), &s);
}

static PyObject *Client_stats(ClientObject *self, PyObject *unused)
{
	struct rdmaps_client_stats s;

	(void)unused;
	if (client_enter(self))
		return NULL;
	rdmaps_client_stats(self->c, &s);
	client_leave(self);
	return u64_dict(client_fields, sizeof(client_fields) / sizeof(client_fields[0]), &s);
}

/* Wire formats by name, as rdmaps-ctl and the trainers spell them. */
static const char *const format_names[] = { "f32", "bf16", "fp16", "topk", "sign" };

static PyObject *Client_set_push_format(ClientObject *self, PyObject *args, PyObject *kw)
{
	static char *kwlist[] = { "tensor", "format", "fraction", NULL };
	TensorObject *t;
	const char *name;
	double fraction = 0.0;
	int rc, fmt = -1;

	if (!PyArg_ParseTupleAndKeywords(args, kw, "O!s|d:set_push_format", kwlist, &TensorType,
					 &t, &name, &fraction))
		return NULL;
	for (int i = 0; i < (int)(sizeof(format_names) / sizeof(format_names[0])); i++)
		if (!strcmp(name, format_names[i]))
			fmt = i;
	if (fmt < 0) {
		PyErr_Format(PyExc_ValueError,
			     "set_push_format: unknown format '%s' (f32, bf16, fp16, topk, sign)", name);
		return NULL;
	}
	if (client_enter(self))
		return NULL;
	rc = rdmaps_set_push_format(self->c, t->t, (enum rdmaps_format)fmt, fraction);
	client_leave(self);
	if (rc)
		return raise_rdmaps(rc, "set_push_format");
	Py_RETURN_NONE;
}

static PyObject *Client_checkpoint(ClientObject *self, PyObject *args, PyObject *kw)
{
	static char *kwlist[] = { "timeout_ms", NULL };
	int timeout_ms = 60000, rc;

	if (!PyArg_ParseTupleAndKeywords(args, kw, "|i:checkpoint", kwlist, &timeout_ms))
		return NULL;
	if (client_enter(self))
		return NULL;
	Py_BEGIN_ALLOW_THREADS
	rc = rdmaps_checkpoint(self->c, timeout_ms);
	Py_END_ALLOW_THREADS
	client_leave(self);
	if (rc)
		return raise_rdmaps(rc, "checkpoint");
	Py_RETURN_NONE;
}

static PyObject *Client_get_num_servers(ClientObject *self, void *unused)
{
	(void)unused;
	return PyLong_FromUnsignedLong(self->c ? rdmaps_num_servers(self->c) : 0);
}

static PyObject *Client_get_closed(ClientObject *self, void *unused)
{
	(void)unused;
	return PyBool_FromLong(!self->c);
}

static PyMethodDef Client_methods[] = {
	{ "declare", (PyCFunction)(void (*)(void))Client_declare, METH_VARARGS | METH_KEYWORDS,
	  "declare(name, length, init=None, init_value=0.0, optimizer='sgd', lr=0.01, momentum=0.0,\n"
	  "        beta1=0.0, beta2=0.0, eps=0.0, weight_decay=0.0, *, consistency='asp',\n"
	  "        staleness=0, workers=0, aggregate_mean=False, clip_norm=0.0,\n"
	  "        pull_format='f32') -> Tensor\n"
	  "Declare a float32 tensor, or attach to it if it exists with the same settings.\n"
	  "init: float32 array of `length` values; the first declaration's values win.\n"
	  "optimizer: sgd, momentum, nesterov, adagrad, adam, adamw (state lives on the server);\n"
	  "consistency: asp, bsp, ssp (docs/consistency.md).\n"
	  "pull_format: 'bf16' or 'fp16': the server keeps a 16-bit copy that pulls read (half\n"
	  "the bytes; pull() converts to float32, pull_half() keeps the 16-bit values)." },
	{ "lookup", (PyCFunction)Client_lookup, METH_VARARGS,
	  "lookup(name) -> Tensor: attach to an existing tensor (rdmaps.Error ENOENT if unknown)." },
	{ "register", (PyCFunction)Client_register, METH_O,
	  "register(array) -> array: register a float32 C-contiguous writeable array with the NIC\n"
	  "once; pulls into and pushes from it (or any contiguous slice of it) are then zero-copy.\n"
	  "The client keeps a reference until deregister() or close()." },
	{ "deregister", (PyCFunction)Client_deregister, METH_O,
	  "deregister(array): undo register() (not while async ops are pending)." },
	{ "pull", (PyCFunction)(void (*)(void))Client_pull, METH_VARARGS | METH_KEYWORDS,
	  "pull(tensor, out, relaxed=False) -> out: read the whole tensor into out (blocking).\n"
	  "relaxed skips the torn-read check (Hogwild)." },
	{ "pull_half", (PyCFunction)(void (*)(void))Client_pull_half, METH_VARARGS | METH_KEYWORDS,
	  "pull_half(tensor, out, relaxed=False) -> out: a tensor declared with pull_format 'bf16'\n"
	  "or 'fp16': its 16-bit values as they are, into a uint16 (bfloat16 bits) or float16\n"
	  "array of the tensor's length." },
	{ "push", (PyCFunction)(void (*)(void))Client_push, METH_VARARGS | METH_KEYWORDS,
	  "push(tensor, grad, folded=False): send a gradient; returns once it is staged on the\n"
	  "server, or with folded=True once the server has applied it." },
	{ "pull_async", (PyCFunction)(void (*)(void))Client_pull_async, METH_VARARGS | METH_KEYWORDS,
	  "pull_async(tensor, out, relaxed=False) -> Op (do not touch out until it completes)" },
	{ "push_async", (PyCFunction)(void (*)(void))Client_push_async, METH_VARARGS | METH_KEYWORDS,
	  "push_async(tensor, grad, folded=False) -> Op (do not modify grad until it completes)" },
	{ "set_push_format", (PyCFunction)(void (*)(void))Client_set_push_format,
	  METH_VARARGS | METH_KEYWORDS,
	  "set_push_format(tensor, format, fraction=0.0): the wire format of the tensor's pushes\n"
	  "from now on: 'f32' (default), 'bf16', 'fp16' (half the bytes), 'topk' (the `fraction`\n"
	  "of each chunk's values of largest magnitude, 0 < fraction <= 0.5) or 'sign' (a bit per\n"
	  "value and a scale). topk and sign keep error feedback: what a push did not send goes\n"
	  "with the next. The gradient is encoded when the push is posted; one compressed push of\n"
	  "a tensor in flight at a time (rdmaps.Error EBUSY). docs/protocol.md, 'Gradient formats'." },
	{ "flush", (PyCFunction)(void (*)(void))Client_flush, METH_VARARGS | METH_KEYWORDS,
	  "flush(timeout_ms=-1): wait until the server has folded every push posted so far." },
	{ "server_stats", (PyCFunction)Client_server_stats, METH_NOARGS,
	  "server_stats() -> dict of the server's counters" },
	{ "stats", (PyCFunction)Client_stats, METH_NOARGS,
	  "stats() -> dict: pulls, pushes, pull_retries, bounce_copies (0 = all zero-copy), "
	  "stale_retries, reconnects, lost_pushes, reads (pull READs posted), server_restarts, resent_slots,\n"
	  "push_bytes (payload bytes of dense pushes, in their wire format), snapshots, failovers\n"
	  "(reconnects that found a rank on the backup that took it over)" },
	{ "checkpoint", (PyCFunction)(void (*)(void))Client_checkpoint, METH_VARARGS | METH_KEYWORDS,
	  "checkpoint(timeout_ms=60000): ask every server to write a checkpoint now." },
	{ "close", (PyCFunction)Client_close, METH_NOARGS,
	  "close(): disconnect; pending ops are abandoned. Idempotent." },
	{ "__enter__", (PyCFunction)Client_enter_ctx, METH_NOARGS, NULL },
	{ "__exit__", (PyCFunction)Client_exit_ctx, METH_VARARGS, NULL },
	{ NULL },
};

static PyGetSetDef Client_getset[] = {
	{ "closed", (getter)Client_get_closed, NULL, "True once close() was called", NULL },
	{ "num_servers", (getter)Client_get_num_servers, NULL, "servers (shards) connected", NULL },
	{ NULL },
};

static PyTypeObject ClientType = {
	PyVarObject_HEAD_INIT(NULL, 0)
	.tp_name = "rdmaps.Client",
	.tp_basicsize = sizeof(ClientObject),
	.tp_dealloc = (destructor)Client_dealloc,
	.tp_repr = (reprfunc)Client_repr,
	.tp_flags = Py_TPFLAGS_DEFAULT,
	.tp_doc = "Client(host, port='7471', token=None, src=None, timeout_ms=5000)\n"
		  "Client(servers='h1:p1,h2:p2' or config='job.ini', token=..., src=...)\n"
		  "A connection to an rdmaps server, or to every shard of a cluster (no host:\n"
		  "servers, config, else $RDMAPS_SERVERS / $RDMAPS_CONFIG; docs/cluster.md).\n"
		  "src: local address that selects the RDMA device. A context manager.",
	.tp_methods = Client_methods,
	.tp_getset = Client_getset,
	.tp_init = (initproc)Client_init,
	.tp_new = PyType_GenericNew,
};

/* ---- Tensor ----------------------------------------------------------- */

static void Tensor_dealloc(TensorObject *self)
{
	Py_XDECREF(self->name);
	Py_XDECREF(self->client);
	PyObject_Free(self);
}

static PyObject *Tensor_repr(TensorObject *self)
{
	return PyUnicode_FromFormat("<rdmaps.Tensor %R length %llu>", self->name,
				    (unsigned long long)self->length);
}

static Py_ssize_t Tensor_len(TensorObject *self)
{
	return (Py_ssize_t)self->length;
}

static PyObject *Tensor_get_length(TensorObject *self, void *unused)
{
	(void)unused;
	return PyLong_FromUnsignedLongLong(self->length);
}

static PyObject *Tensor_get_name(TensorObject *self, void *unused)
{
	(void)unused;
	Py_INCREF(self->name);
	return self->name;
}

static PyObject *Tensor_get_client(TensorObject *self, void *unused)
{
	(void)unused;
	Py_INCREF(self->client);
	return (PyObject *)self->client;
}

static PyGetSetDef Tensor_getset[] = {
	{ "length", (getter)Tensor_get_length, NULL, "number of float32 elements", NULL },
	{ "name", (getter)Tensor_get_name, NULL, "tensor name", NULL },
	{ "client", (getter)Tensor_get_client, NULL, "the Client it was obtained from", NULL },
	{ NULL },
};

static PySequenceMethods Tensor_seq = { .sq_length = (lenfunc)Tensor_len };

static PyTypeObject TensorType = {
	PyVarObject_HEAD_INIT(NULL, 0)
	.tp_name = "rdmaps.Tensor",
	.tp_basicsize = sizeof(TensorObject),
	.tp_dealloc = (destructor)Tensor_dealloc,
	.tp_repr = (reprfunc)Tensor_repr,
	.tp_as_sequence = &Tensor_seq,
	.tp_flags = Py_TPFLAGS_DEFAULT,
	.tp_doc = "A tensor on the server (from Client.declare or Client.lookup).",
	.tp_getset = Tensor_getset,
};

/* ---- Op --------------------------------------------------------------- */

/* Record completion: release the array and the pending count. Client locked. */
static void op_complete(OpObject *self, int status)
{
	self->done = 1;
	self->status = status;
	self->op = NULL;
	self->client->pending--;
}

/* Result of a completed op: True, or raise its error. */
static PyObject *op_result(OpObject *self)
{
	if (self->status)
		return raise_rdmaps(self->status, self->kind);
	Py_RETURN_TRUE;
}

/* 1: the op can no longer complete through us (closed client, or fork). */
static int op_orphaned(OpObject *self)
{
	return !self->client->c || self->client->pid != getpid();
}

static PyObject *Op_test(OpObject *self, PyObject *unused)
{
	int rc;

	(void)unused;
	if (self->done)
		return op_result(self);
	if (op_orphaned(self)) {
		PyErr_SetString(PyExc_ValueError, "the op's Client is closed (or belongs to the "
						  "parent process)");
		return NULL;
	}
	if (client_enter(self->client))
		return NULL;
	if (!self->done) { /* another thread may have completed it meanwhile */
		rc = rdmaps_test(self->op);
		if (rc == RDMAPS_EAGAIN) {
			client_leave(self->client);
			Py_RETURN_FALSE;
		}
		op_complete(self, rc);
	}
	client_leave(self->client);
	Py_CLEAR(self->arr);
	return op_result(self);
}

static PyObject *Op_wait(OpObject *self, PyObject *args, PyObject *kw)
{
	static char *kwlist[] = { "timeout_ms", NULL };
	int timeout_ms = -1, rc;

	if (!PyArg_ParseTupleAndKeywords(args, kw, "|i:wait", kwlist, &timeout_ms))
		return NULL;
	if (self->done) {
		PyObject *r = op_result(self);
		if (!r)
			return NULL;
		Py_DECREF(r);
		Py_RETURN_NONE;
	}
	if (op_orphaned(self)) {
		PyErr_SetString(PyExc_ValueError, "the op's Client is closed (or belongs to the "
						  "parent process)");
		return NULL;
	}
	if (client_enter(self->client))
		return NULL;
	if (!self->done) {
		rdmaps_op *op = self->op;
		Py_BEGIN_ALLOW_THREADS
		rc = rdmaps_wait(op, timeout_ms);
		Py_END_ALLOW_THREADS
		if (rc == RDMAPS_ETIMEDOUT) { /* the op is kept: wait again later */
			client_leave(self->client);
			return raise_rdmaps(rc, "wait");
		}
		op_complete(self, rc);
	}
	client_leave(self->client);
	Py_CLEAR(self->arr);
	if (self->status)
		return raise_rdmaps(self->status, self->kind);
	Py_RETURN_NONE;
}

static void Op_dealloc(OpObject *self)
{
	/*
	 * Dropped while pending: the NIC may still be reading or writing the
	 * array, so finish the op before releasing it. (A closed client already
	 * abandoned it, and a forked child never owned it.)
	 */
	if (!self->done && self->client && !op_orphaned(self)) {
		ClientObject *c = self->client;
		rdmaps_op *op = self->op;
		Py_BEGIN_ALLOW_THREADS
		PyThread_acquire_lock(c->lock, WAIT_LOCK);
		if (c->c)
			rdmaps_wait(op, -1);
		PyThread_release_lock(c->lock);
		Py_END_ALLOW_THREADS
		c->pending--;
	}
	Py_XDECREF(self->arr);
	Py_XDECREF(self->client);
	PyObject_Free(self);
}

static PyObject *Op_get_done(OpObject *self, void *unused)
{
	(void)unused;
	return PyBool_FromLong(self->done);
}

static PyObject *Op_repr(OpObject *self)
{
	return PyUnicode_FromFormat("<rdmaps.Op %s %s>", self->kind,
				    self->done ? (self->status ? "failed" : "done") : "pending");
}

static PyMethodDef Op_methods[] = {
	{ "test", (PyCFunction)Op_test, METH_NOARGS,
	  "test() -> bool: progress without blocking; True once complete (raises if it failed)" },
	{ "wait", (PyCFunction)(void (*)(void))Op_wait, METH_VARARGS | METH_KEYWORDS,
	  "wait(timeout_ms=-1): block until complete (raises if it failed); on timeout raises\n"
	  "rdmaps.Error ETIMEDOUT and the op stays pending" },
	{ NULL },
};

static PyGetSetDef Op_getset[] = {
	{ "done", (getter)Op_get_done, NULL, "True once test() or wait() saw it complete", NULL },
	{ NULL },
};

static PyTypeObject OpType = {
	PyVarObject_HEAD_INIT(NULL, 0)
	.tp_name = "rdmaps.Op",
	.tp_basicsize = sizeof(OpObject),
	.tp_dealloc = (destructor)Op_dealloc,
	.tp_repr = (reprfunc)Op_repr,
	.tp_flags = Py_TPFLAGS_DEFAULT,
	.tp_doc = "An asynchronous pull or push (Client.pull_async / push_async).",
	.tp_methods = Op_methods,
	.tp_getset = Op_getset,
};

/* ---- module functions ------------------------------------------------- */

static PyObject *mod_strerror(PyObject *m, PyObject *arg)
{
	(void)m;
	long v = PyLong_AsLong(arg);
	if (v == -1 && PyErr_Occurred())
		return NULL;
	return PyUnicode_FromString(rdmaps_strerror((int)v));
}

static PyObject *mod_err_name(PyObject *m, PyObject *arg)
{
	(void)m;
	long v = PyLong_AsLong(arg);
	if (v == -1 && PyErr_Occurred())
		return NULL;
	return PyUnicode_FromString(rdmaps_err_name((int)v));
}

static PyObject *mod_launch_info(PyObject *m, PyObject *unused)
{
	int rank = -1, size = -1, rc;

	(void)m;
	(void)unused;
	if ((rc = rdmaps_launch_info(&rank, &size)))
		return raise_rdmaps(rc, "launch_info");
	return Py_BuildValue("(ii)", rank, size);
}

static const char *fork_mode = "disabled"; /* set once, at import (fork_setup) */

static PyObject *mod_fork_mode(PyObject *m, PyObject *unused)
{
	(void)m;
	(void)unused;
	return PyUnicode_FromString(fork_mode);
}

static void zeros_free(PyObject *capsule)
{
	void *p = PyCapsule_GetPointer(capsule, "rdmaps.zeros");
	size_t *len = PyCapsule_GetContext(capsule);

	if (p && len) {
		munmap(p, *len);
		free(len);
	}
}

/* A zero-filled float32 array on pages of its own (see the module doc). */
static PyObject *mod_zeros(PyObject *m, PyObject *args)
{
	PyArray_Dims shape = { NULL, 0 };
	npy_intp n = 1;
	size_t bytes, *ctx;
	void *p;
	PyObject *arr, *cap;

	(void)m;
	if (!PyArg_ParseTuple(args, "O&:zeros", PyArray_IntpConverter, &shape))
		return NULL;
	for (int i = 0; i < shape.len; i++) {
		if (shape.ptr[i] <= 0 || n > NPY_MAX_INTP / 4 / shape.ptr[i]) {
			PyDimMem_FREE(shape.ptr);
			PyErr_SetString(PyExc_ValueError, "zeros: every dimension must be positive");
			return NULL;
		}
		n *= shape.ptr[i];
	}
	bytes = ((size_t)n * sizeof(float) + 4095) & ~(size_t)4095;
	p = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	ctx = malloc(sizeof(*ctx));
	if (p == MAP_FAILED || !ctx) {
		if (p != MAP_FAILED)
			munmap(p, bytes);
		free(ctx);
		PyDimMem_FREE(shape.ptr);
		return PyErr_NoMemory();
	}
	*ctx = bytes;
	arr = PyArray_SimpleNewFromData(shape.len, shape.ptr, NPY_FLOAT32, p);
	PyDimMem_FREE(shape.ptr);
	cap = arr ? PyCapsule_New(p, "rdmaps.zeros", zeros_free) : NULL;
	if (!cap || PyCapsule_SetContext(cap, ctx) ||
	    PyArray_SetBaseObject((PyArrayObject *)arr, cap)) { /* steals cap */
		if (!cap) {
			munmap(p, bytes);
			free(ctx);
		}
		Py_XDECREF(arr);
		return NULL;
	}
	return arr;
}

static PyMethodDef mod_methods[] = {
	{ "strerror", mod_strerror, METH_O, "strerror(code) -> str: rdmaps_strerror()" },
	{ "err_name", mod_err_name, METH_O, "err_name(code) -> str, e.g. 'RDMAPS_ENOENT'" },
	{ "launch_info", mod_launch_info, METH_NOARGS,
	  "launch_info() -> (rank, size) from the launcher (Slurm, MPI, torchrun, RDMAPS_RANK...),\n"
	  "-1 where unknown" },
	{ "fork_mode", mod_fork_mode, METH_NOARGS,
	  "fork_mode() -> 'kernel' | 'madvise' | 'disabled': how registered memory survives\n"
	  "fork(). kernel: the kernel copies it into the child; madvise: it is absent in the\n"
	  "child (MADV_DONTFORK); disabled: fork() while registered is unsafe" },
	{ "zeros", mod_zeros, METH_VARARGS,
	  "zeros(shape) -> float32 ndarray, zero-filled, page-aligned, on pages of its own:\n"
	  "the safe kind of array to register() when fork_mode() is 'madvise'" },
	{ NULL },
};

/*
 * fork() and RDMA. A registered buffer is pinned; a forked child used to share
 * those pages copy-on-write, and the parent's next write then moved the
 * parent to a fresh page the NIC knew nothing about (silent corruption).
 * Two cures, decided once at import, before any verbs resource exists:
 *  - 'kernel': kernels >= 5.13 copy pinned pages into the child at fork time
 *    (libibverbs reports IBV_FORK_UNNEEDED). Parent and child both keep
 *    working memory; nothing to do. Debian 12's 6.1 kernel does this. Here
 *    the binding must NOT call ibv_fork_init() nor set RDMAV_FORK_SAFE:
 *    rdma-core 44 (Debian 12) then still marks every registration
 *    MADV_DONTFORK (measured: VmFlags "dc"), so registered arrays vanish from
 *    children, which is strictly worse.
 *  - 'madvise': older kernels. The binding sets RDMAV_FORK_SAFE=1 in
 *    os.environ (covering other verbs users in this process and children it
 *    spawns) and calls ibv_fork_init(): registered ranges become
 *    MADV_DONTFORK, so the parent stays correct and those pages are simply
 *    absent in the child (touching a registered array there faults). Register
 *    only arrays from rdmaps.zeros() so no other object shares their pages.
 *    A user who sets RDMAV_FORK_SAFE/IBV_FORK_SAFE gets this mode too.
 *  - 'disabled': ibv_fork_init() failed (verbs used before the import).
 * In every mode a child must not use the parent's Client (its queue pairs are
 * the parent's): it gets a RuntimeError, and closing or garbage-collecting
 * it there leaves the parent's connection alone.
 */
static int fork_setup(PyObject *m)
{
	PyObject *os, *env, *r;
	int rc = 0;

	if (ibv_is_fork_initialized() == IBV_FORK_UNNEEDED) {
		fork_mode = getenv("RDMAV_FORK_SAFE") || getenv("IBV_FORK_SAFE") ? "madvise" : "kernel";
		return PyModule_AddIntConstant(m, "fork_init_status", 0);
	}
	if (!(os = PyImport_ImportModule("os")))
		return -1;
	env = PyObject_GetAttrString(os, "environ");
	Py_DECREF(os);
	if (!env)
		return -1;
	r = PyObject_CallMethod(env, "setdefault", "ss", "RDMAV_FORK_SAFE", "1");
	Py_DECREF(env);
	if (!r)
		return -1;
	Py_DECREF(r);
	rc = ibv_fork_init();
	fork_mode = rc ? "disabled" : "madvise";
	if (rc && PyErr_WarnFormat(PyExc_RuntimeWarning, 1,
				   "rdmaps: ibv_fork_init() failed (%s): RDMA was used in this "
				   "process before `import rdmaps`; fork() is not safe",
				   strerror(rc)))
		return -1;
	return PyModule_AddIntConstant(m, "fork_init_status", rc);
}

static struct PyModuleDef rdmaps_module = {
	PyModuleDef_HEAD_INIT,
	.m_name = "rdmaps._rdmaps",
	.m_doc = "rdmaps: RDMA parameter server client (librdmaps) for numpy float32 arrays.\n"
		 "Client(...), Tensor, Op, Error; E* error codes; zeros(); fork_mode().",
	.m_size = -1,
	.m_methods = mod_methods,
};

PyMODINIT_FUNC PyInit__rdmaps(void)
{
	PyObject *m;

	import_array();
	if (PyType_Ready(&ClientType) < 0 || PyType_Ready(&TensorType) < 0 ||
	    PyType_Ready(&OpType) < 0)
		return NULL;
	m = PyModule_Create(&rdmaps_module);
	if (!m)
		return NULL;
	RdmapsError = PyErr_NewExceptionWithDoc(
		"rdmaps.Error",
		"An rdmaps library error: .code (negative rdmaps_err, see rdmaps.E*), .name "
		"('RDMAPS_E...'), .strerror (rdmaps_strerror text).",
		NULL, NULL);
	if (!RdmapsError)
		goto fail;
	/* class-level defaults, so every instance has the attributes */
	PyObject_SetAttrString(RdmapsError, "code", Py_None);
	PyObject_SetAttrString(RdmapsError, "name", Py_None);
	PyObject_SetAttrString(RdmapsError, "strerror", Py_None);
	Py_INCREF(RdmapsError);
	if (PyModule_AddObject(m, "Error", RdmapsError) < 0) {
		Py_DECREF(RdmapsError);
		goto fail;
	}
	Py_INCREF(&ClientType);
	Py_INCREF(&TensorType);
	Py_INCREF(&OpType);
	if (PyModule_AddObject(m, "Client", (PyObject *)&ClientType) < 0 ||
	    PyModule_AddObject(m, "Tensor", (PyObject *)&TensorType) < 0 ||
	    PyModule_AddObject(m, "Op", (PyObject *)&OpType) < 0)
		goto fail;
#define ADD_ERR(name, val, msg)                                                   \
	if (PyModule_AddIntConstant(m, "E" #name, -(val)) < 0)                    \
		goto fail;
	RDMAPS_ERR_MAP(ADD_ERR)
#undef ADD_ERR
	if (PyModule_AddIntConstant(m, "OK", 0) < 0 ||
	    PyModule_AddStringConstant(m, "__version__", "0.1.0") < 0)
		goto fail;
	if (fork_setup(m) < 0)
		goto fail;
	return m;
fail:
	Py_DECREF(m);
	return NULL;
}
