/* FdSocket: the few socket calls a Leg makes on a descriptor it does not own (TCP_INFO,
 * SO_LINGER, shutdown, a peek for the receive timestamp), without a socket object.
 *
 * Why: CPython 3.11's socket.socket(fileno=...) calls getsockname() to check the descriptor,
 * even with the family given, so every borrowed socket object costs a syscall; a leg borrows
 * one (net/tcpinfo.py: borrow), two a connection. This type takes the descriptor as it is,
 * and reads TCP_INFO parsed (tcp_info), where a socket object's getsockopt gives the bytes.
 * Built only in the compiled build (setup.py, BALANCER_MYPYC=1); the pure build borrows a
 * socket object (tcpinfo.info parses its getsockopt's bytes). Every other method answers as
 * socket.socket's does: the same arguments (only the forms the Leg uses), the same return
 * values, OSError (its errno subclass) on failure.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <string.h>
#include <sys/socket.h>

typedef struct {
    PyObject_HEAD int fd;
} FdSocket;

static PyObject *fdsocket_new(PyTypeObject *type, PyObject *args, PyObject *kwargs) {
    FdSocket *self = (FdSocket *)type->tp_alloc(type, 0);
    if (self != NULL)
        self->fd = -1; /* no descriptor until __init__ names one */
    return (PyObject *)self;
}

static int fdsocket_init(FdSocket *self, PyObject *args, PyObject *kwargs) {
    int fd;
    if (kwargs != NULL && PyDict_GET_SIZE(kwargs)) {
        PyErr_SetString(PyExc_TypeError, "FdSocket() takes the descriptor alone");
        return -1;
    }
    if (!PyArg_ParseTuple(args, "i:FdSocket", &fd))
        return -1;
    self->fd = fd;
    return 0;
}

static PyObject *fdsocket_fileno(FdSocket *self, PyObject *unused) {
    return PyLong_FromLong(self->fd);
}

/* The descriptor is the transport's: let go of it (never closed here). */
static PyObject *fdsocket_detach(FdSocket *self, PyObject *unused) {
    int fd = self->fd;
    self->fd = -1;
    return PyLong_FromLong(fd);
}

static PyObject *closed_error(void) {
    errno = EBADF;
    return PyErr_SetFromErrno(PyExc_OSError);
}

static uint32_t u32_at(const unsigned char *raw, size_t offset) {
    uint32_t value;
    memcpy(&value, raw + offset, sizeof(value));
    return value;
}

static uint64_t u64_at(const unsigned char *raw, size_t offset) {
    uint64_t value;
    memcpy(&value, raw + offset, sizeof(value));
    return value;
}

/* tcp_info(cls) -> cls(state, unacked, rtt_seconds, total_retrans, bytes_acked,
 * bytes_received, bytes_sent) or None: TCP_INFO read and parsed as tcpinfo.info parses it
 * (the same offsets, the same None for counters an older kernel lacks, bytes_sent less
 * retransmissions), made straight into `cls` (tcpinfo.TCPInfo, a tuple): one object where
 * the Python parse makes six. */
static PyObject *fdsocket_tcp_info(FdSocket *self, PyObject *cls) {
    if (!PyType_Check(cls) || !PyType_IsSubtype((PyTypeObject *)cls, &PyTuple_Type)) {
        PyErr_SetString(PyExc_TypeError, "tcp_info() takes a tuple type");
        return NULL;
    }
    if (self->fd < 0)
        return closed_error();
    unsigned char raw[232];
    memset(raw, 0, sizeof(raw));
    socklen_t size = sizeof(raw);
    if (getsockopt(self->fd, IPPROTO_TCP, TCP_INFO, raw, &size) < 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    if (size < 104)
        Py_RETURN_NONE;
    PyObject *items[7] = {
        PyLong_FromLong(raw[0]),
        PyLong_FromUnsignedLong(u32_at(raw, 24)),
        PyFloat_FromDouble((double)u32_at(raw, 68) / 1e6),
        PyLong_FromUnsignedLong(u32_at(raw, 100)),
        NULL, NULL, NULL,
    };
    if (size >= 136) {
        items[4] = PyLong_FromUnsignedLongLong(u64_at(raw, 120));
        items[5] = PyLong_FromUnsignedLongLong(u64_at(raw, 128));
    } else {
        items[4] = Py_NewRef(Py_None);
        items[5] = Py_NewRef(Py_None);
    }
    if (size >= 216)
        items[6] = PyLong_FromLongLong((long long)u64_at(raw, 200) - (long long)u64_at(raw, 208));
    else
        items[6] = Py_NewRef(Py_None);
    PyObject *result = ((PyTypeObject *)cls)->tp_alloc((PyTypeObject *)cls, 7);
    for (int index = 0; index < 7; index++) {
        if (items[index] == NULL || result == NULL) {
            for (int rest = 0; rest < 7; rest++)
                Py_XDECREF(items[rest]);
            Py_XDECREF(result);
            return NULL;
        }
    }
    for (int index = 0; index < 7; index++)
        PyTuple_SET_ITEM(result, index, items[index]);
    return result;
}

/* setsockopt(level, optname, value: bytes) -> None */
static PyObject *fdsocket_setsockopt(FdSocket *self, PyObject *args) {
    int level, optname;
    Py_buffer value;
    if (!PyArg_ParseTuple(args, "iiy*:setsockopt", &level, &optname, &value))
        return NULL;
    if (self->fd < 0) {
        PyBuffer_Release(&value);
        return closed_error();
    }
    int failed = setsockopt(self->fd, level, optname, value.buf, (socklen_t)value.len) < 0;
    PyBuffer_Release(&value);
    if (failed)
        return PyErr_SetFromErrno(PyExc_OSError);
    Py_RETURN_NONE;
}

/* shutdown(how) -> None */
static PyObject *fdsocket_shutdown(FdSocket *self, PyObject *arg) {
    int how = PyLong_AsLong(arg);
    if (how == -1 && PyErr_Occurred())
        return NULL;
    if (self->fd < 0)
        return closed_error();
    if (shutdown(self->fd, how) < 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    Py_RETURN_NONE;
}

/* recvmsg(bufsize, ancbufsize, flags) -> (data, [(level, type, data)], msg_flags, None) */
static PyObject *fdsocket_recvmsg(FdSocket *self, PyObject *args) {
    Py_ssize_t bufsize, ancbufsize;
    int flags;
    if (!PyArg_ParseTuple(args, "nni:recvmsg", &bufsize, &ancbufsize, &flags))
        return NULL;
    if (bufsize < 0 || bufsize > 65536 || ancbufsize < 0 || ancbufsize > 4096) {
        PyErr_SetString(PyExc_ValueError, "recvmsg sizes out of range");
        return NULL;
    }
    if (self->fd < 0)
        return closed_error();
    PyObject *received = PyBytes_FromStringAndSize(NULL, bufsize);
    if (received == NULL)
        return NULL;
    union {
        char bytes[4096];
        struct cmsghdr aligned; /* (a control buffer must be aligned for cmsghdr) */
    } control;
    struct iovec vector = {PyBytes_AS_STRING(received), (size_t)bufsize};
    struct msghdr message;
    memset(&message, 0, sizeof(message));
    message.msg_iov = &vector;
    message.msg_iovlen = 1;
    message.msg_control = ancbufsize ? control.bytes : NULL;
    message.msg_controllen = (size_t)ancbufsize;
    ssize_t got = recvmsg(self->fd, &message, flags);
    if (got < 0) {
        Py_DECREF(received);
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    if (_PyBytes_Resize(&received, (Py_ssize_t)got) < 0)
        return NULL;
    PyObject *ancillary = PyList_New(0);
    if (ancillary == NULL) {
        Py_DECREF(received);
        return NULL;
    }
    for (struct cmsghdr *header = CMSG_FIRSTHDR(&message); header != NULL;
         header = CMSG_NXTHDR(&message, header)) {
        size_t size = header->cmsg_len - CMSG_LEN(0);
        PyObject *item = Py_BuildValue("(iiy#)", header->cmsg_level, header->cmsg_type,
                                       (const char *)CMSG_DATA(header), (Py_ssize_t)size);
        if (item == NULL || PyList_Append(ancillary, item) < 0) {
            Py_XDECREF(item);
            Py_DECREF(ancillary);
            Py_DECREF(received);
            return NULL;
        }
        Py_DECREF(item);
    }
    return Py_BuildValue("(NNiO)", received, ancillary, message.msg_flags, Py_None);
}

static PyMethodDef fdsocket_methods[] = {
    {"fileno", (PyCFunction)fdsocket_fileno, METH_NOARGS, "The descriptor (-1 once detached)."},
    {"detach", (PyCFunction)fdsocket_detach, METH_NOARGS, "Let go of the descriptor."},
    {"tcp_info", (PyCFunction)fdsocket_tcp_info, METH_O,
     "tcp_info(cls) -> cls(...) or None: TCP_INFO parsed (see tcpinfo.info)"},
    {"setsockopt", (PyCFunction)fdsocket_setsockopt, METH_VARARGS,
     "setsockopt(level, optname, value: bytes)"},
    {"shutdown", (PyCFunction)fdsocket_shutdown, METH_O, "shutdown(how)"},
    {"recvmsg", (PyCFunction)fdsocket_recvmsg, METH_VARARGS,
     "recvmsg(bufsize, ancbufsize, flags) -> (data, ancillary, msg_flags, None)"},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject FdSocketType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "balancer.net._fdsocket.FdSocket",
    .tp_basicsize = sizeof(FdSocket),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Socket calls on a descriptor owned elsewhere (see the module's comment).",
    .tp_methods = fdsocket_methods,
    .tp_init = (initproc)fdsocket_init,
    .tp_new = fdsocket_new,
};

static struct PyModuleDef fdsocket_module = {
    PyModuleDef_HEAD_INIT, "_fdsocket", "Socket calls on a borrowed descriptor.", -1, NULL,
};

PyMODINIT_FUNC PyInit__fdsocket(void) {
    if (PyType_Ready(&FdSocketType) < 0)
        return NULL;
    PyObject *module = PyModule_Create(&fdsocket_module);
    if (module == NULL)
        return NULL;
    Py_INCREF(&FdSocketType);
    if (PyModule_AddObject(module, "FdSocket", (PyObject *)&FdSocketType) < 0) {
        Py_DECREF(&FdSocketType);
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
