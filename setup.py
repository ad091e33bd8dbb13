from setuptools import setup

setup(
    name="smtprelay",
    version="0.1.0",
    description="A reverse SMTP proxy: nginx's mail proxy for SMTP, as one Python file",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    py_modules=["smtprelay"],
    python_requires=">=3.9",
    install_requires=["requests", "ConfigArgParse"],
    extras_require={"metrics": ["prometheus_client"],
                    "test": ["pytest", "trustme", "hypothesis", "prometheus_client"]},
    entry_points={"console_scripts": ["smtprelay = smtprelay:main"]},
)
